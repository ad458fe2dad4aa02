"""The files of a Hugging Face model folder: names, safetensors shards, tokenizer files.

Reading: `weight_files` maps every checkpoint key to its safetensors file (one file, an index of
shards, or any *.safetensors); pickle checkpoints (.bin, .pt, ...) are refused, since unpickling
can run arbitrary code. Writing: `save_state_dict` cuts shards at tensor boundaries once they would
exceed 2 GiB and writes the index, as transformers does, so folders written here load with
`from_pretrained` and with `qlora.hf.load.load_model`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import torch

from qlora.errors import UsageError
from qlora.io import plain_permissions
from qlora.progress import byte_bar

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)


def weight_files(folder: Path) -> dict[str, Path]:
    """Map every checkpoint key to its safetensors file (honouring a sharded folder's index)."""
    index = folder / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise UsageError(f"{index}: not a safetensors index (needs a 'weight_map'): {err}") from err
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise UsageError(f"{index} names shard files that do not exist: {missing}")
        return {key: folder / f for key, f in weight_map.items()}
    single = folder / SAFE_WEIGHTS
    files = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UsageError(
                f"{folder}: only pickle checkpoints found ({', '.join(pickles)}); qlora loads "
                "safetensors only, since unpickling can run arbitrary code. Convert them to "
                "safetensors first (e.g. transformers' save_pretrained(safe_serialization=True))"
            )
        raise UsageError(f"{folder}: no {SAFE_WEIGHTS}, {SAFE_INDEX} or *.safetensors file")
    return {key: f for f in files for key in _safetensors_keys(f)}


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as err:
        raise UsageError(f"{path}: not a readable safetensors file ({err})") from err


def tensor_nbytes(files: Iterable[Path]) -> dict[str, int]:
    """Bytes of every tensor in the safetensors ``files``, from their headers (the format: an 8-byte
    little-endian header length, then a JSON header giving each tensor's ``data_offsets``)."""
    sizes = {}
    for path in set(files):
        try:
            with open(path, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                          if k != "__metadata__"})
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UsageError(f"{path}: not a readable safetensors file ({err})") from err
    return sizes


def save_state_dict(folder: str | Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write ``tensors`` as ``model.safetensors``, or as shards plus ``model.safetensors.index.json``.

    Shards are cut at tensor boundaries once they would exceed ``max_shard_bytes`` (as transformers
    does).
    """
    folder = Path(folder)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    storages: set[int] = set()
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in storages:  # e.g. one codebook shared by all layers
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        shards[-1][name] = tensor
        size += nbytes
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    names = [SAFE_WEIGHTS] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                     for i in range(1, len(shards) + 1)]
    with byte_bar(total, "write") as bar:
        for fname, shard in zip(names, shards):
            _save_file(shard, folder / fname)
            bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
    if len(shards) == 1:
        return
    weight_map = {k: fname for fname, shard in zip(names, shards) for k in shard}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})
    plain_permissions(path)  # save_file makes it 0600


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
