#!/usr/bin/env python
"""One prepared device check: the GPU path against the CPU reference, its speed against its peers,
and the mission's headline (a LLaMA-65B QLoRA step under a 48 GB cap) as a measurement.

    python tools/gpu_check.py [--json PATH]        # on a CUDA machine: <= 8 minutes on one H200
    python tools/gpu_check.py --smoke              # the same code at toy sizes (CPU: a smoke test)

Sections, each a block of rows in one table and one JSON (`--json`, default gpu_check.json):
1. exact     quantise + dequantise on the device (Triton) == the CPU reference, bit for bit: every
             quant type, block sizes 64..4096, with and without double quantisation, odd element
             counts, tensors that cross the kernels' tile and chunk seams, bf16 / fp16 / fp32 outputs.
2. bnb       against bitsandbytes' CUDA kernels when importable: our dequantise of their packed
             tensors equals theirs; the 4-bit codes equal theirs. Their CUDA 8-bit quantiser (double
             quantisation) searches the dynamic map by exact midpoints while ours reproduces their
             CPU path's 65,536-point grid, so nested codes may differ in a few constants: counted.
3. speed     dequantise GB/s (packed + scales read, 16-bit written) against a `copy_` of the same
             output and against bitsandbytes; 1-row matvec GB/s; Linear4bit forward+backward vs a
             bf16 nn.Linear at 4096 tokens.
4. step      a randomly initialised Llama of ~1.3B parameters (real shapes, built in-process): ours
             vs transformers + PEFT + bitsandbytes, tokens/s and torch.cuda.max_memory_allocated, and
             `qlora memory`'s plan for the same step against our measured peak.
5. 65b       a LLaMA-65B-shaped model with random weights, built and quantised on the GPU layer by
             layer (never the 130 GB of bf16 at once), one QLoRA step at the 65B recipe's settings
             (r=64 all-linear, seq 512, batch 1, checkpointing, paged 8-bit AdamW) under
             torch.cuda.set_per_process_memory_fraction capped at 48 GiB; its peak against the plan.

The GPU machine is offline and has no bitsandbytes or peft: carry them. bitsandbytes' wheel is
mostly CUDA libraries for many versions; its Python package plus the one `libbitsandbytes_cuda<ver>.so`
matching the machine's CUDA (a few MB) is enough:
    pip download --no-deps bitsandbytes==0.50.2 peft==0.21.2 -d wheels/    (on a networked machine)
    unzip the bitsandbytes wheel, delete every libbitsandbytes_cuda*.so but the matching one
    (and libbitsandbytes_cpu.so), zip it back or put the folder on PYTHONPATH; peft is pure Python.
Sections needing a missing library say so in their rows instead of failing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from contextlib import contextmanager

import torch

from qlora.quant import dequantize_4bit, matmul_4bit, quantize_4bit

GIB = 1024**3
Row = dict  # {"section", "name", "ok" (bool or None), "value", "unit", "detail"}


# ------------------------------------------------------------------------------------ helpers


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def backend(name: str):
    saved = os.environ.get("QLORA_BACKEND")
    os.environ["QLORA_BACKEND"] = name
    try:
        yield
    finally:
        os.environ.pop("QLORA_BACKEND")
        if saved is not None:
            os.environ["QLORA_BACKEND"] = saved


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def row(section: str, name: str, ok=None, value=None, unit: str = "", detail: str = "") -> Row:
    return {"section": section, "name": name, "ok": ok, "value": value, "unit": unit, "detail": detail}


# ------------------------------------------------------------------------------------ 1. exact


def exactness(device: torch.device, smoke: bool) -> list[Row]:
    shapes = [(37, 301), (129, 515)] if smoke else [(37, 301), (4099, 1027), (3, 1 << 21)]
    rows = []
    for quant_type in ("nf4", "fp4", "int4"):
        for blocksize in (64, 4096) if smoke else (64, 128, 256, 512, 1024, 2048, 4096):
            for double_quant in (False, True):
                bad = [f"{s}" for s in shapes if not _same_as_reference(s, quant_type, blocksize, double_quant, device)]
                rows.append(row("exact", f"{quant_type} bs{blocksize}{' dq' if double_quant else ''}", not bad,
                                detail=f"shapes {shapes}" + (f"; differ: {bad}" if bad else "")))
    return rows


def _same_as_reference(shape, quant_type: str, blocksize: int, double_quant: bool, device: torch.device) -> bool:
    g = torch.Generator().manual_seed(hash((shape, quant_type, blocksize)) % 2**31)
    w = torch.randn(*shape, generator=g).to(torch.bfloat16)
    w[0, : min(shape[1], blocksize)] = 0  # an all-zero block
    packed, state = quantize_4bit(w.to(device), quant_type, blocksize, double_quant)
    with backend("reference"):
        ref_packed, ref_state = quantize_4bit(w, quant_type, blocksize, double_quant)
        ref_values = {dt: dequantize_4bit(ref_packed, ref_state, out=torch.empty(shape, dtype=dt))
                      for dt in (torch.bfloat16, torch.float16, torch.float32)}
    same = torch.equal(packed.cpu(), ref_packed) and torch.equal(state.absmax.cpu(), ref_state.absmax)
    if double_quant:
        same = same and torch.equal(state.state2.absmax.cpu(), ref_state.state2.absmax)
        same = same and torch.equal(state.state2.offset.cpu(), ref_state.state2.offset)
    for dt, expected in ref_values.items():
        got = dequantize_4bit(packed, state, out=torch.empty(shape, dtype=dt, device=device))
        same = same and torch.equal(got.cpu(), expected)
    return same


# ------------------------------------------------------------------------------------ 2. bnb


def versus_bitsandbytes(device: torch.device) -> list[Row]:
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as err:
        return [row("bnb", "bitsandbytes", None, detail=f"not importable ({err}); see the docstring")]
    if device.type != "cuda":
        return [row("bnb", "bitsandbytes CUDA kernels", None, detail="no CUDA device")]
    rows = []
    w = torch.randn(4099, 1027, device=device, dtype=torch.bfloat16)
    for quant_type in ("nf4", "fp4"):
        for dq in (False, True):
            theirs, st = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=dq)
            ours, state = quantize_4bit(w, quant_type, 64, dq)
            codes = torch.equal(ours.view(-1), theirs.view(-1))
            ours_of_theirs = dequantize_4bit(theirs.view(-1), _state_from_bnb(st))
            values = torch.equal(ours_of_theirs.view(-1), bnbf.dequantize_4bit(theirs, st).view(-1))
            nested = "" if not dq else (f"; nested codes differing: "
                                        f"{int((state.absmax != st.absmax).sum())} of {st.absmax.numel()}")
            rows.append(row("bnb", f"{quant_type}{' dq' if dq else ''} vs bitsandbytes CUDA", codes and values,
                            detail=f"codes equal {codes}, dequantise of their bytes equal {values}{nested}"))
    return rows


def _state_from_bnb(st):
    """Our QuantState from a bitsandbytes QuantState (through its serialised layout)."""
    from qlora.quant import QuantState

    return QuantState.from_dict(st.as_dict(packed=True), prefix="")


# ------------------------------------------------------------------------------------ 3. speed


def speed(device: torch.device, smoke: bool, repeat: int) -> list[Row]:
    shapes = [(512, 512)] if smoke else [(4096, 4096), (8192, 8192), (8192, 28672)]
    rows = []
    for shape in shapes:
        rows += _dequant_speed(shape, device, repeat)
    w = torch.randn(*shapes[-1], dtype=torch.bfloat16, device=device)
    packed, state = quantize_4bit(w)
    x = torch.randn(1, shapes[-1][1], dtype=torch.bfloat16, device=device)
    seconds = timed(lambda: matmul_4bit(x, packed, state), device, repeat)
    read = packed.numel() + state.absmax.numel() + x.numel() * 2
    rows.append(row("speed", f"matvec 1x{shapes[-1][1]} @ {shapes[-1][0]}x{shapes[-1][1]}.T", None,
                    read / seconds / 1e9, "GB/s", f"{seconds * 1e6:.1f} us"))
    rows.append(_linear_speed(device, 256 if smoke else 4096, 512 if smoke else 4096, repeat))
    return rows


def _dequant_speed(shape, device: torch.device, repeat: int) -> list[Row]:
    w = torch.randn(*shape, dtype=torch.bfloat16, device=device)
    packed, state = quantize_4bit(w)
    out = torch.empty_like(w)
    seconds = timed(lambda: dequantize_4bit(packed, state, out=out), device, repeat)
    copy = timed(lambda: out.copy_(w), device, repeat)
    moved = packed.numel() + state.absmax.numel() + out.numel() * 2
    name = f"dequantise {shape[0]}x{shape[1]} nf4+dq -> bf16"
    rows = [row("speed", name, None, moved / seconds / 1e9, "GB/s",
                f"{seconds * 1e6:.0f} us; copy_ of the output {out.numel() * 4 / copy / 1e9:.0f} GB/s "
                f"(read+write), ours/copy_ time {seconds / copy:.2f}")]
    try:
        import bitsandbytes.functional as bnbf

        bp, bs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        theirs = timed(lambda: bnbf.dequantize_4bit(bp, bs), device, repeat)
        rows.append(row("speed", f"{name} vs bitsandbytes", seconds <= 1.1 * theirs, theirs / seconds, "x",
                        f"bitsandbytes {theirs * 1e6:.0f} us (>= 1/1.1 passes)"))
    except ImportError:
        pass
    return rows


def _linear_speed(device: torch.device, tokens: int, width: int, repeat: int) -> Row:
    from qlora.nn import Linear4bit

    dense = torch.nn.Linear(width, width, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
    layer = Linear4bit.from_linear(dense, compute_dtype=torch.bfloat16)
    x = torch.randn(tokens, width, dtype=torch.bfloat16, device=device, requires_grad=True)
    ours = timed(lambda: layer(x).sum().backward(), device, repeat)
    peer = timed(lambda: dense(x).sum().backward(), device, repeat)
    return row("speed", f"Linear4bit fwd+bwd {tokens} tokens {width}x{width} vs bf16 nn.Linear",
               ours <= 1.15 * peer, ours / peer, "x time", "target <= 1.15")


# ------------------------------------------------------------------------------------ 4. step


def llama_config(kind: str, smoke: bool):
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024)
    shapes = {"1.3b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16),
              "65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64)}
    return LlamaConfig(**shapes[kind], vocab_size=32000, max_position_embeddings=2048)


def build_ours(config, device: torch.device, r: int):
    """Random Llama on `device`, its linears quantised layer by layer as they are made; LoRA on top."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from qlora.adapters.spec import LoraSpec
    from qlora.adapters.surgery import apply_lora, prepare_for_training
    from qlora.nn import Linear4bit
    from qlora.nn.swap import swap_modules
    from qlora.quant.format import QuantFormat

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fmt = QuantFormat()
    for layer in model.model.layers:  # one layer of bf16 weights at a time
        layer.to_empty(device=device)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() == 2 else torch.nn.init.ones_(p)
        swap_modules(layer, lambda m, _: isinstance(m, torch.nn.Linear), lambda m: Linear4bit.quantize(m.weight, fmt))
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
        module.to_empty(device=device)
        torch.nn.init.normal_(module.weight, std=0.02) if module.weight.dim() == 2 else torch.nn.init.ones_(module.weight)
    model.model.rotary_emb.to(device)
    apply_lora(model, LoraSpec(r=r, alpha=16, dropout=0.05))
    return prepare_for_training(model, gradient_checkpointing=True)


def _optimizer(model):
    from qlora.config import OptimConfig
    from qlora.training.optim import build_optimizer

    try:
        import bitsandbytes  # noqa: F401

        name = "paged_adamw_8bit"
    except ImportError:
        name = "adamw"
    return build_optimizer(model, OptimConfig(name=name, lr=1e-4)), name


def step_ours(model, device: torch.device, batch: int, seq: int, vocab: int, steps: int) -> dict:
    from qlora.nn.loss import CausalLMLoss

    loss_fn = CausalLMLoss(model)
    optimizer, optim_name = _optimizer(model)
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    mask = torch.ones_like(ids)

    def one() -> None:
        total, n = loss_fn(ids, mask, ids)
        (total / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one()  # warm-up: optimiser states, kernels
    reset_peak(device)
    seconds = timed(one, device, steps)
    return {"tokens_per_s": batch * seq / seconds, "peak_bytes": peak_bytes(device), "optimizer": optim_name}


def step_peer(config, device: torch.device, batch: int, seq: int, steps: int, tmp: str) -> dict | str:
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ImportError as err:
        return f"not importable ({err})"
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp)
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=qc, dtype=torch.bfloat16,
                                                 device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    cls = bnb.optim.PagedAdamW8bit if device.type == "cuda" else bnb.optim.AdamW8bit
    optimizer = cls([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)

    def one() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one()
    reset_peak(device)
    seconds = timed(one, device, steps)
    return {"tokens_per_s": batch * seq / seconds, "peak_bytes": peak_bytes(device)}


def plan_for(config, seq: int, batch: int, r: int, device: torch.device, optimizer: str) -> int:
    from qlora.memory import PlanSettings, plan_memory, shape_from_config

    settings = PlanSettings(lora_r=r, seq_len=seq, micro_batch=batch, grad_checkpointing=True, optimizer=optimizer,
                            loss="chunked", device="cuda" if device.type == "cuda" else "cpu", lora_dropout=0.05)
    return plan_memory(shape_from_config(config.to_dict(), "check"), settings).total_bytes


def training_step(device: torch.device, smoke: bool, tmp: str) -> list[Row]:
    config = llama_config("1.3b", smoke)
    batch, seq, steps = (2, 64, 2) if smoke else (4, 1024, 5)
    reset_peak(device)
    ours = step_ours(build_ours(config, device, r=16), device, batch, seq, config.vocab_size, steps)
    gc.collect()
    peer = step_peer(config, device, batch, seq, steps, tmp)
    rows = [row("step", f"ours ~1.3B Llama, {batch}x{seq} tokens", None, ours["tokens_per_s"], "tokens/s",
                f"peak {_gib(ours['peak_bytes'])}, {ours['optimizer']}")]
    if isinstance(peer, str):
        rows.append(row("step", "transformers + PEFT + bitsandbytes", None, detail=peer))
    else:
        rows.append(row("step", "ours / peer tokens/s", ours["tokens_per_s"] >= peer["tokens_per_s"],
                        ours["tokens_per_s"] / peer["tokens_per_s"], "x",
                        f"peer {peer['tokens_per_s']:.0f} tokens/s, peak {_gib(peer['peak_bytes'])}"))
    if ours["peak_bytes"]:
        plan = plan_for(config, seq, batch, 16, device, ours["optimizer"])
        rows.append(row("step", "plan / measured peak (ours)", abs(plan / ours["peak_bytes"] - 1) <= 0.10,
                        plan / ours["peak_bytes"], "x", f"plan {_gib(plan)} (within 10% passes)"))
    return rows


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f} GiB"


# ------------------------------------------------------------------------------------ 5. 65b


def headline_65b(device: torch.device, smoke: bool) -> list[Row]:
    config = llama_config("65b", smoke)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, 48 * GIB / total), device)
    reset_peak(device)
    try:
        t0 = time.perf_counter()
        model = build_ours(config, device, r=64)
        built = time.perf_counter() - t0
        result = step_ours(model, device, 1, 64 if smoke else 512, config.vocab_size, 1)
    except torch.OutOfMemoryError as err:
        return [row("65b", "LLaMA-65B QLoRA step under a 48 GiB cap", False, detail=f"out of memory: {err}")]
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    rows = [row("65b", "LLaMA-65B QLoRA step under a 48 GiB cap", True, result["tokens_per_s"], "tokens/s",
                f"built + quantised on the device in {built:.0f} s; peak {_gib(result['peak_bytes'])}; "
                f"{result['optimizer']}")]
    if result["peak_bytes"]:
        plan = plan_for(config, 512, 1, 64, device, result["optimizer"])
        rows.append(row("65b", "plan / measured peak", abs(plan / result["peak_bytes"] - 1) <= 0.10,
                        plan / result["peak_bytes"], "x", f"plan {_gib(plan)} (39.1 GiB in the README)"))
    return rows


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="toy sizes (the default without CUDA)")
    p.add_argument("--repeat", type=int, default=20, help="timed calls per measurement (median)")
    p.add_argument("--sections", default="exact,bnb,speed,step,65b", help="comma-separated subset")
    p.add_argument("--json", default="gpu_check.json", help="where to write every figure")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    smoke = args.smoke or device.type != "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; {'smoke sizes' if smoke else 'full sizes'}", flush=True)
    import tempfile

    sections = {"exact": lambda: exactness(device, smoke), "bnb": lambda: versus_bitsandbytes(device),
                "speed": lambda: speed(device, smoke, 3 if smoke else args.repeat),
                "step": lambda: training_step(device, smoke, tempfile.mkdtemp(prefix="gpu-check-")),
                "65b": lambda: headline_65b(device, smoke)}
    rows: list[Row] = []
    for key in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            new = sections[key]()
        except Exception as err:  # one broken section must not cost the others' figures
            new = [row(key, "section failed", False, detail=f"{type(err).__name__}: {err}")]
        rows += new
        for r in new:
            ok = {True: "ok", False: "FAIL", None: ""}[r["ok"]]
            value = "" if r["value"] is None else f"{r['value']:.3g} {r['unit']}"
            print(f"{r['section']:<6} {r['name']:<58} {ok:>4} {value:>16}  {r['detail']}", flush=True)
        print(f"{key}: {time.perf_counter() - t0:.1f} s", flush=True)
    with open(args.json, "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "smoke": smoke, "rows": rows}, f, indent=2)
    return 1 if any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
