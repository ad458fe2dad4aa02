"""Sections of the 4-bit kernels: exactness against the CPU reference, agreement with
bitsandbytes' kernels, and speed against `copy_` and bitsandbytes."""

from __future__ import annotations

import torch

from gpucheck.common import Context, Row, backend, row, timed
from qlora.quant import dequantize_4bit, matmul_4bit, quantize_4bit, reference


# ------------------------------------------------------------------------------------ exact


def exactness(ctx: Context) -> list[Row]:
    """Quantise + dequantise on the device == the CPU reference, bit for bit (offset included:
    it is a fixed-order mean, the same on every device)."""
    shapes = [(37, 301), (129, 515)] if ctx.smoke else [(37, 301), (4099, 1027), (3, 1 << 21)]
    rows = []
    for quant_type in ("nf4", "fp4", "int4"):
        for blocksize in (64, 4096) if ctx.smoke else (64, 128, 256, 512, 1024, 2048, 4096):
            for double_quant in (False, True):
                bad = [f"{s}: {why}" for s in shapes
                       if (why := _differs_from_reference(s, quant_type, blocksize, double_quant, ctx.device))]
                rows.append(row("exact", f"{quant_type} bs{blocksize}{' dq' if double_quant else ''}", not bad,
                                detail=f"shapes {shapes}" + (f"; differ: {bad}" if bad else "")))
    return rows


def _differs_from_reference(shape, quant_type: str, blocksize: int, double_quant: bool, device) -> str:
    """'' when the device's bytes and values equal the CPU reference's, else what differs."""
    g = torch.Generator().manual_seed(hash((shape, quant_type, blocksize)) % 2**31)
    w = torch.randn(*shape, generator=g).to(torch.bfloat16)
    w[0, : min(shape[1], blocksize)] = 0  # an all-zero block
    packed, state = quantize_4bit(w.to(device), quant_type, blocksize, double_quant)
    with backend("reference"):
        ref_packed, ref_state = quantize_4bit(w, quant_type, blocksize, double_quant)
        expected = {dt: dequantize_4bit(ref_packed, ref_state, out=torch.empty(shape, dtype=dt))
                    for dt in (torch.bfloat16, torch.float16, torch.float32)}
    parts = {"codes": (packed, ref_packed), "absmax": (state.absmax, ref_state.absmax)}
    if double_quant:
        parts.update(offset=(state.offset, ref_state.offset), nested_absmax=(state.state2.absmax, ref_state.state2.absmax))
    for dt, values in expected.items():
        parts[f"values {dt}"] = (dequantize_4bit(packed, state, out=torch.empty(shape, dtype=dt, device=device)), values)
    return ", ".join(name for name, (a, b) in parts.items() if not torch.equal(a.cpu(), b))


# ------------------------------------------------------------------------------------ bnb


def versus_bitsandbytes(ctx: Context) -> list[Row]:
    """Our 4-bit codes == theirs, and our dequantise of their bytes == theirs. With double
    quantisation the offset (theirs: torch's fp32 mean, device-dependent) and the nested codes
    (theirs on CUDA: exact midpoints, ours: their CPU grid) are reported apart: given THEIR offset,
    how many nested codes differ. Neither fails a row (quant/backends.py says why)."""
    import bitsandbytes.functional as bnbf

    shape = (256, 512) if ctx.smoke else (4099, 1027)
    w = torch.randn(*shape, device=ctx.device, dtype=torch.bfloat16)
    rows = []
    with torch.compiler.set_stance("force_eager"):  # bnb's CPU path is torch.compile'd per shape
        for quant_type in ("nf4", "fp4"):
            for dq in (False, True):
                theirs, st = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=dq)
                ours, state = quantize_4bit(w, quant_type, 64, dq)
                codes = torch.equal(ours.view(-1), theirs.view(-1))
                values = torch.equal(dequantize_4bit(theirs.view(-1), _state_from_bnb(st)).view(-1),
                                     bnbf.dequantize_4bit(theirs, st).view(-1))
                detail = f"codes equal {codes}, dequantise of their bytes equal {values}"
                if dq:
                    detail += "; " + _nested_detail(w, quant_type, state, st)
                rows.append(row("bnb", f"{quant_type}{' dq' if dq else ''} vs bitsandbytes {ctx.device.type}",
                                codes and values, detail=detail))
    return rows


def _nested_detail(w: torch.Tensor, quant_type: str, state, st) -> str:
    ulps = abs(int(state.offset.view(torch.int32)) - int(st.offset.float().view(torch.int32)))
    plain = quantize_4bit(w, quant_type, 64, double_quant=False)[1].absmax
    codes, nested_absmax, _ = reference.double_quantize(plain, offset=st.offset.float())
    differ = int((codes != st.absmax).sum())
    return (f"offset {ulps} ulp from theirs; given their offset, nested codes differing {differ} of "
            f"{codes.numel()}, nested absmax equal {torch.equal(nested_absmax, st.state2.absmax)}")


def _state_from_bnb(st):
    """Our QuantState from a bitsandbytes QuantState (through its serialised layout)."""
    from qlora.quant import QuantState

    return QuantState.from_dict(st.as_dict(packed=True), prefix="")


# ------------------------------------------------------------------------------------ speed


def speed(ctx: Context) -> list[Row]:
    shapes = [(512, 512)] if ctx.smoke else [(4096, 4096), (8192, 8192), (8192, 28672)]
    rows = []
    for shape in shapes:
        rows += _dequant_speed(ctx, shape)
    w = torch.randn(*shapes[-1], dtype=torch.bfloat16, device=ctx.device)
    packed, state = quantize_4bit(w)
    x = torch.randn(1, shapes[-1][1], dtype=torch.bfloat16, device=ctx.device)
    seconds = timed(lambda: matmul_4bit(x, packed, state), ctx.device, ctx.repeat)
    read = packed.numel() + state.absmax.numel() + x.numel() * 2
    rows.append(row("speed", f"matvec 1x{shapes[-1][1]} @ {shapes[-1][0]}x{shapes[-1][1]}.T", None,
                    read / seconds / 1e9, "GB/s", f"{seconds * 1e6:.1f} us"))
    rows.append(_linear_speed(ctx, 256 if ctx.smoke else 4096, 512 if ctx.smoke else 4096))
    return rows


def _dequant_speed(ctx: Context, shape) -> list[Row]:
    w = torch.randn(*shape, dtype=torch.bfloat16, device=ctx.device)
    packed, state = quantize_4bit(w)
    out = torch.empty_like(w)
    seconds = timed(lambda: dequantize_4bit(packed, state, out=out), ctx.device, ctx.repeat)
    copy = timed(lambda: out.copy_(w), ctx.device, ctx.repeat)
    moved = packed.numel() + state.absmax.numel() + out.numel() * 2
    name = f"dequantise {shape[0]}x{shape[1]} nf4+dq -> bf16"
    rows = [row("speed", name, None, moved / seconds / 1e9, "GB/s",
                f"{seconds * 1e6:.0f} us; copy_ of the output {out.numel() * 4 / copy / 1e9:.0f} GB/s "
                f"(read+write), ours/copy_ time {seconds / copy:.2f}")]
    if ctx.has("bitsandbytes"):
        import bitsandbytes.functional as bnbf

        with torch.compiler.set_stance("force_eager"):
            bp, bs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            theirs = timed(lambda: bnbf.dequantize_4bit(bp, bs), ctx.device, ctx.repeat)
        rows.append(row("speed", f"{name} vs bitsandbytes", _target(ctx, seconds <= 1.1 * theirs), theirs / seconds,
                        "x", f"bitsandbytes {theirs * 1e6:.0f} us (>= 1/1.1 passes)"))
    return rows


def _linear_speed(ctx: Context, tokens: int, width: int) -> Row:
    from qlora.nn import Linear4bit

    dense = torch.nn.Linear(width, width, bias=False, device=ctx.device, dtype=torch.bfloat16).requires_grad_(False)
    layer = Linear4bit.from_linear(dense, compute_dtype=torch.bfloat16)
    x = torch.randn(tokens, width, dtype=torch.bfloat16, device=ctx.device, requires_grad=True)
    ours = timed(lambda: layer(x).sum().backward(), ctx.device, ctx.repeat)
    peer = timed(lambda: dense(x).sum().backward(), ctx.device, ctx.repeat)
    return row("speed", f"Linear4bit fwd+bwd {tokens} tokens {width}x{width} vs bf16 nn.Linear",
               _target(ctx, ours <= 1.15 * peer), ours / peer, "x time", "target <= 1.15")


def _target(ctx: Context, met: bool) -> bool | None:
    """A speed target judges full sizes on CUDA; a smoke run only reports the figure."""
    return None if ctx.smoke else met
