"""An Ollama Modelfile beside an exported GGUF: ``ollama create NAME -f OUT.Modelfile``.

Ollama templates are Go templates, not Jinja, so the Jinja chat template the run trained with is
recognised by its markers and written as the matching Go template (ChatML, Llama 3, Gemma,
Phi-3) with that family's stop tokens; the tokenizer's eos is always a stop token. A ChatML
template that writes a default system turn (SmolLM2's) gets it as the Modelfile's SYSTEM. A template of
another family is left out: Ollama then derives one from the GGUF's ``tokenizer.chat_template``
where it knows it, and a comment in the file says so.
"""

from __future__ import annotations

import re
from pathlib import Path

from qlora.gguf.vocab import TokenizerInfo
from qlora.io import write_text_atomic

# (marker in the Jinja template, Go template, stop tokens)
FAMILIES = (
    ("<|im_start|>",
     "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
     "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
     "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n",
     ("<|im_start|>", "<|im_end|>")),
    ("<|start_header_id|>",
     "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
     "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
     "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
     ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    ("<start_of_turn>",
     "<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
     "<start_of_turn>model\n{{ .Response }}<end_of_turn>\n",
     ("<end_of_turn>",)),
    ("<|assistant|>",
     "{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
     "{{ if .Prompt }}<|user|>\n{{ .Prompt }}<|end|>\n{{ end }}<|assistant|>\n{{ .Response }}<|end|>\n",
     ("<|end|>", "<|user|>", "<|assistant|>")),
)


def default_system(template: str) -> str | None:
    """The system turn a ChatML template writes into a chat that has none (SmolLM2's "You are a
    helpful AI assistant named SmolLM, ..."): the run trained with it, so Ollama should send it too."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        text = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template).render(
            messages=[{"role": "user", "content": "?"}], add_generation_prompt=False, bos_token="", eos_token="")
    except Exception:  # a template that needs transformers' extras (raise_exception, tools, ...)
        return None
    found = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return found.group(1) if found else None


def modelfile_path(gguf_path: Path) -> Path:
    return gguf_path.with_suffix(".Modelfile")


def modelfile_text(gguf_path: Path, tokenizer: TokenizerInfo) -> str:
    """``FROM ./OUT.gguf``, the Go template and ``PARAMETER stop`` lines."""
    lines = [f"FROM ./{gguf_path.name}"]
    family = next((f for f in FAMILIES if tokenizer.chat_template and f[0] in tokenizer.chat_template), None)
    stops = list(family[2]) if family else []
    if tokenizer.eos and tokenizer.eos not in stops:
        stops.append(tokenizer.eos)
    if family:
        lines.append(f'TEMPLATE """{family[1]}"""')
        system = default_system(tokenizer.chat_template) if family is FAMILIES[0] else None
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# No TEMPLATE: Ollama derives it from the GGUF's tokenizer.chat_template where it can.")
    lines += [f'PARAMETER stop "{stop}"' for stop in stops if stop in tokenizer.tokens]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, tokenizer: TokenizerInfo) -> Path:
    return write_text_atomic(modelfile_path(gguf_path), modelfile_text(gguf_path, tokenizer))
