"""`qlora export ... --gguf OUT.gguf`: a run, an adapter or a model as one GGUF file for llama.cpp,
Ollama and LM Studio, with an Ollama Modelfile beside it.

The source is a run folder (its ``adapter/``), an adapter folder (merged into its base, found as
`qlora merge` finds it, or ``--base``), or a model (a folder, a 4-bit export, a built-in name):
written as it is. Everything that can be refused is checked before a byte is written: the
architecture, the type, the output path, the tokenizer, an adapter that does not fit the base.
Then the header (metadata, tokenizer, tensor table) and the tensors stream into a temporary file
beside OUT that is renamed over it at the end (`qlora.io.atomic_file`): a killed export leaves a
``.OUT.gguf.XXXX.tmp`` file, never a file named OUT. A byte bar counts the tensor bytes written.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from qlora.errors import UsageError


@dataclass(frozen=True)
class Source:
    """What to export: the base model folder, the adapter folder (or None), the tokenizer folder."""

    base: Path
    adapter: Path | None
    tokenizer: Path


def resolve_source(source: str | Path, base: str | None = None) -> Source:
    """RUN_DIR | ADAPTER | MODEL -> `Source` (see the module docstring)."""
    from qlora.adapters.merge import adapter_base
    from qlora.adapters.spec import CONFIG_FILE
    from qlora.hf.folder import model_folder
    from qlora.run_dir import RunDir

    path, run = Path(source), RunDir(source)
    adapter = None
    if path.is_dir() and run.is_run():
        if not run.adapter.is_dir():
            raise UsageError(f"{path}: a run folder without adapter/ (the run has not finished); "
                             "export a checkpoint's adapter folder instead")
        adapter = run.adapter
    elif (path / CONFIG_FILE).is_file():
        adapter = path
    if adapter is None:
        folder = model_folder(base or source)
        return Source(folder, None, folder)
    folder = model_folder(adapter_base(adapter, base))
    tokenizer = adapter if (adapter / "tokenizer_config.json").is_file() else folder
    return Source(folder, adapter, tokenizer)


def check_output_file(out: str | Path, overwrite: bool) -> Path:
    """OUT.gguf, refused when it or its OUT.Modelfile exists (unless ``overwrite``, and then only a
    GGUF file is replaced), or has no folder."""
    from qlora.gguf.modelfile import modelfile_path

    out = Path(out)
    if out.suffix != ".gguf":
        raise UsageError(f"--gguf {str(out)!r}: the file name must end in .gguf")
    for path in (out, modelfile_path(out)):
        if path.exists() and not overwrite:
            raise UsageError(f"output {path} already exists; choose another path or pass --overwrite")
    if out.is_file() and out.read_bytes()[:4] != b"GGUF":  # --overwrite replaces a GGUF file, nothing else
        raise UsageError(f"output {out} exists and is not a GGUF file; --overwrite replaces GGUF files only")
    if out.is_dir():
        raise UsageError(f"output {out} is a folder; --gguf takes a file name")
    if not out.parent.is_dir():
        raise UsageError(f"--gguf {str(out)!r}: directory {str(out.parent)!r} does not exist")
    return out


def _updates(adapter: Path | None):
    from qlora.adapters.merge import AdapterUpdates
    from qlora.adapters.peft_format import read_adapter_weights
    from qlora.adapters.spec import LoraSpec, read_spec

    if adapter is None:
        return AdapterUpdates({}, LoraSpec())
    spec, _ = read_spec(adapter)
    return AdapterUpdates(read_adapter_weights(adapter), spec)


def _chat_template(source: Source) -> str | None:
    """The template the run trained with (saved beside its adapter), else the tokenizer's own."""
    from qlora.hf.chat_template import saved_chat_template

    return saved_chat_template(source.adapter) if source.adapter is not None else None


def _metadata(writer, source: Source, wanted) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(source.adapter.parent.name if source.adapter is not None else source.base.name)
    writer.add_file_type(int(gguf.LlamaFileType[wanted.file_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def export_gguf(source: str | Path, out: str | Path, *, type_name: str = "bf16", base: str | None = None,
                overwrite: bool = False) -> Path:
    """Write ``source`` (merged when it is an adapter or run) as the GGUF file ``out`` of
    ``type_name`` and an Ollama ``Modelfile`` beside it; returns ``out``."""
    import gguf
    import numpy as np

    from qlora.gguf.arch import architecture, check_supported, write_hparams
    from qlora.gguf.modelfile import write_modelfile
    from qlora.gguf.tensors import Checkpoint, gguf_type, plan, produce
    from qlora.gguf.vocab import write_tokenizer
    from qlora.hf.files import weight_files
    from qlora.hf.folder import load_config
    from qlora.hf.load import _Checkpoint
    from qlora.io import atomic_file
    from qlora.progress import byte_bar

    wanted = gguf_type(type_name)
    out = check_output_file(out, overwrite)
    src = resolve_source(source, base)
    config = load_config(src.base)
    arch = architecture(config)
    check_supported(config)
    updates = _updates(src.adapter)
    with ExitStack() as stack:
        checkpoint = Checkpoint(_Checkpoint(weight_files(src.base), stack))
        planned = plan(checkpoint, arch, config, updates, wanted)
        n_vocab = next(p.shape[0] for p in planned if p.name == "token_embd.weight")
        with atomic_file(out) as tmp:
            writer = gguf.GGUFWriter(tmp, arch.gguf)
            stack.callback(writer.close)
            _metadata(writer, src, wanted)
            write_hparams(writer, config, arch, n_vocab)
            tokenizer = write_tokenizer(writer, src.tokenizer, n_vocab, _chat_template(src))
            for item in planned:
                writer.add_tensor_info(item.name, item.shape, np.dtype(np.float32), item.nbytes,
                                       raw_dtype=gguf.GGMLQuantizationType[item.ggml])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with byte_bar(sum(p.nbytes for p in planned), "export") as bar:
                for item, data in produce(planned, checkpoint, arch, config, updates, wanted):
                    writer.write_tensor_data(data)
                    bar.update(item.nbytes)
            writer.close()
    write_modelfile(out, tokenizer)
    return out
