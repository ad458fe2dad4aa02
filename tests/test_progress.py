"""Progress bars (`qlora.progress.byte_bar`) of loading, quantising and merging: bytes and bytes/s on
a terminal's stderr, silent elsewhere (pytest's capture included), each bar complete at its end."""

from __future__ import annotations

import io
import json

import pytest
from tqdm import tqdm

import qlora.progress
from qlora.adapters.merge import merge_adapter
from qlora.adapters.peft_format import save_adapter
from qlora.adapters.spec import LoraSpec
from qlora.adapters.surgery import apply_lora
from qlora.hf.export import quantize_folder
from qlora.hf.load import load_model
from qlora.progress import byte_bar
from tiny_models import save_tiny


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Recorded(tqdm):
    """A tqdm that remembers (desc, total, n at close) of every bar made through `byte_bar`
    (enabled, so that it counts, and drawn into a string)."""

    bars: list[tuple[str, int, int]] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})

    def close(self) -> None:
        if not getattr(self, "_recorded", False):
            self._recorded = True
            _Recorded.bars.append((self.desc.split(" ")[0], self.total, self.n))
        super().close()


@pytest.fixture
def recorded(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(qlora.progress, "tqdm", _Recorded)
    _Recorded.bars = []
    return _Recorded.bars


def _data_bytes(safetensors_file) -> int:
    """Bytes of a safetensors file minus its header: the tensors."""
    raw = safetensors_file.read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


def test_bars_show_bytes_per_second_on_a_terminal_only(monkeypatch):
    assert byte_bar(10, "load").disable  # pytest captures stderr: not a terminal
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with byte_bar(3 * 2**20, "load") as bar:
        bar.update(2**20)
        bar.refresh()
        assert not bar.disable and "load" in terminal.getvalue() and "B/s" in terminal.getvalue()
    monkeypatch.setenv("RANK", "1")  # torchrun's other processes stay quiet
    assert byte_bar(10, "load").disable
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TQDM_DISABLE", "1")  # tqdm's own switch
    assert byte_bar(10, "load").disable


def test_quantize_counts_every_byte_read_and_written(tmp_path, recorded):
    src = save_tiny("llama", tmp_path / "src")
    quantize_folder(str(src), tmp_path / "q4")
    assert [name for name, _, _ in recorded] == ["load", "write"]
    (_, read_total, read), (_, write_total, written) = recorded
    assert read_total == read == _data_bytes(src / "model.safetensors")
    assert write_total == written == _data_bytes(tmp_path / "q4" / "model.safetensors")
    recorded.clear()  # a pre-quantised folder reads its codes and quantisation state, all of them
    load_model(tmp_path / "q4")
    assert recorded[0][1] == recorded[0][2] == written


def test_merge_counts_loading_folding_and_writing(tmp_path, recorded):
    base = save_tiny("llama", tmp_path / "base")
    model = load_model(base, quant=None)
    spec = LoraSpec(r=4, alpha=8, targets=("q_proj", "v_proj"))
    apply_lora(model, spec)
    save_adapter(model, tmp_path / "adapter", spec, str(base))
    recorded.clear()
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    assert [name for name, _, _ in recorded] == ["load", "merge", "write"]
    assert all(total == n > 0 for _, total, n in recorded), recorded
    config = json.loads((base / "config.json").read_text())
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    q, v = h, config["num_key_value_heads"] * h // config["num_attention_heads"]
    assert recorded[1][1] == layers * (q + v) * h * 2  # the folded q/v weights, in bf16
