"""GGUF export for llama.cpp / Ollama / LM Studio (`qlora export --gguf`): architectures (`arch`),
the tokenizer (`vocab`), the streamed tensors (`tensors`), the file (`export`) and the Ollama
Modelfile (`modelfile`). Written with the `gguf` package only; no llama.cpp checkout or build."""
