"""The tokenizer as GGUF keys: vocabulary, merges, token types, special tokens, chat template.

llama.cpp tokenises by itself from these keys, so they must describe the tokenizer the model was
trained with. gguf's vocab classes read the Hugging Face files: ``BpeVocab`` for byte-level BPE
(GPT-2 style: SmolLM, Llama 3, Qwen; ``tokenizer.ggml.model = gpt2`` plus merges),
``LlamaHfVocab`` for a byte-fallback BPE ``tokenizer.json`` and ``SentencePieceVocab`` for a
``tokenizer.model`` (Llama 2, Mistral, Gemma, Phi-3; ``tokenizer.ggml.model = llama`` plus
scores). ``SpecialVocab`` adds merges, bos / eos / pad ids, add_bos and the chat template.

Two things those classes leave to the converter:
- token types: an added token that is also in the base vocabulary (SmolLM2's ``<|im_end|>``) is
  typed NORMAL by ``BpeVocab``; llama.cpp then reads it as text. Every added token is typed from
  ``tokenizer.json``: special -> CONTROL, other -> USER_DEFINED.
- the pre-tokenizer (``tokenizer.ggml.pre``): llama.cpp splits text with a regex it picks by this
  name. It is read off ``tokenizer.json``'s pre_tokenizer: plain byte-level is ``gpt-2``, digits
  split one by one then byte-level is ``smollm``, and a split regex is named by the table
  transformers' GGUF reader keeps (llama.cpp name -> regex). Anything else is written as
  ``default`` with a warning: llama.cpp may then split some text differently.

Whether llama.cpp prepends bos (``add_bos_token``) is what ``SpecialVocab`` reads from
tokenizer_config.json or tokenizer.json's post-processor, else false, and always written:
llama.cpp's default differs by vocabulary, transformers adds none unless those files say so.
A vocabulary shorter than the embedding is padded with ``[PAD<i>]`` tokens (type UNUSED), as
llama.cpp's converter does; a longer one is an error (the tokenizer is not this model's).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from qlora.errors import UsageError


@dataclass(frozen=True)
class TokenizerInfo:
    """What the Modelfile needs to know about the written tokenizer."""

    chat_template: str | None
    eos: str | None
    tokens: tuple[str, ...]


def _base_vocab(folder: Path):
    import gguf

    for kind in (gguf.BpeVocab, gguf.LlamaHfVocab, gguf.SentencePieceVocab):
        try:
            return kind(folder)
        except (FileNotFoundError, TypeError):
            continue
        except ImportError as err:  # SentencePieceVocab without the sentencepiece package
            raise UsageError(f"{folder}: reading tokenizer.model needs {err.name or 'sentencepiece'}: pip install sentencepiece") from err
    raise UsageError(f"{folder}: no tokenizer that GGUF can hold (a byte-level BPE or byte-fallback tokenizer.json, "
                     "or a SentencePiece tokenizer.model)")


def _tokenizer_json(folder: Path) -> dict:
    path = folder / "tokenizer.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _split_names() -> dict[str, str]:
    """regex -> llama.cpp pre-tokenizer name (the first name transformers lists for it)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    names: dict[str, str] = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        names.setdefault(regex, name)
    return names


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer.json pre-tokenizer (see the module docstring)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    splits = [step.get("pattern", {}).get("Regex") for step in steps if step.get("type") == "Split"]
    if splits and splits[0] in _split_names():
        return _split_names()[splits[0]]
    print(f"qlora export: warning: pre-tokenizer {kinds} has no llama.cpp name; writing 'default' "
          "(llama.cpp may split some text differently from transformers)", file=sys.stderr)
    return "default"


def _typed_tokens(vocab, tokenizer_json: dict, n_vocab: int, folder: Path) -> tuple[list[bytes], list[float], list[int]]:
    import gguf

    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text.encode("utf-8") if isinstance(text, str) else text)
        scores.append(score)
        types.append(int(kind))
    for added in tokenizer_json.get("added_tokens", []):
        if added["id"] < len(types):
            types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    if len(tokens) > n_vocab:
        raise UsageError(f"{folder}: the tokenizer has {len(tokens)} tokens but the model's embedding has {n_vocab} "
                         "rows (a tokenizer of another model?)")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return tokens, scores, types


def write_tokenizer(writer, folder: Path, n_vocab: int, chat_template: str | None) -> TokenizerInfo:
    """Add the tokenizer of ``folder`` (with ``chat_template`` when given) to the GGUF ``writer``."""
    import gguf

    vocab = _base_vocab(folder)
    tokenizer_json = _tokenizer_json(folder)
    tokens, scores, types = _typed_tokens(vocab, tokenizer_json, n_vocab, folder)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    else:
        writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n_vocab)
    if chat_template is not None:
        special.chat_template = chat_template
    special.add_special_token.setdefault("bos", False)  # neither file adds one; llama.cpp's default varies
    special.add_to_gguf(writer, quiet=True)
    eos_id = special.special_token_ids.get("eos")
    texts = tuple(t.decode("utf-8", errors="replace") for t in tokens)
    template = special.chat_template if isinstance(special.chat_template, str) else None
    return TokenizerInfo(template, texts[eos_id] if eos_id is not None else None, texts)
