"""Triton kernels for blockwise 4-bit dequantise / quantise / matrix-vector product.

Imported lazily by `qlora.quant.triton` (it needs triton, and `TRITON_INTERPRET` must be set before
the `@triton.jit` decorators below run if the interpreter is wanted). The launch code, argument
checks and tile choices live in `__init__.py`; these kernels trust their arguments.

Exactness rules (bit-identical to `qlora.quant.reference`, i.e. bitsandbytes):

- fp32 -> bf16 is rounded here with integer ops (`_bf16_bits`), and bf16 -> fp32 is a 16-bit shift
  (`_to_f32`): Triton's interpreter truncates fp32 -> bf16 and mangles bf16 subnormals both ways,
  and the integer forms are exact on every backend. bf16 tensors are therefore passed as int16
  views. fp32 <-> fp16 uses Triton's own casts (round to nearest even in the interpreter, which
  converts with numpy, and `cvt.rn` on GPUs; the tests check subnormals and overflow).
- Divisions use `tl.math.div_rn`: a plain `/` lowers to the approximate `div.full.f32` on NVIDIA.
- The double-quant scale decode `code[c] * nested_absmax + offset` must round twice; every kernel
  here is launched with `enable_fp_fusion=False`, and the gemv asks for its FMAs explicitly.
- The clamp constant 1e-38 is an fp32 subnormal; it is built from its bit pattern because a Python
  float below 2**-126 would become an fp64 constant.
- Offsets: tile starts are int64 (tensors may exceed 2**31 elements); offsets inside a tile are int32.
"""

from __future__ import annotations

import triton
import triton.language as tl

TINY_BITS = tl.constexpr(0x006CE3EE)  # float32(1e-38), bitsandbytes' clamp on absmax

# dtype kinds (KIND / OUT_KIND / IN_KIND / X_KIND): 0 fp32, 1 bf16 (travels as int16 bits), 2 fp16


@triton.jit
def _to_f32(raw, KIND: tl.constexpr):
    """Loaded values (fp32, int16 bf16 bits, or fp16) -> fp32, exactly."""
    if KIND == 1:
        return (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return raw.to(tl.float32)


@triton.jit
def _bf16_bits(v):
    """fp32 -> bf16 bit pattern (int16), round to nearest even; NaN stays a (quiet) NaN."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, (bits >> 16) | 0x40, rounded).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _from_f32(v, KIND: tl.constexpr):
    """fp32 -> the stored form of dtype KIND, rounded to nearest even."""
    if KIND == 1:
        return _bf16_bits(v)
    elif KIND == 2:
        return v.to(tl.float16)
    else:
        return v


@triton.jit
def _block_scales(absmax_ptr, blk, mask, ncode_ptr, nabs_ptr, offset_ptr, nb, NESTED: tl.constexpr):
    """fp32 scale of each block index in `blk` (any shape); masked lanes give 0.

    Nested: code[c] * nested_absmax[b // nb] (rounded) + offset (rounded), as the reference's
    `dequantize_8bit_blocks(...) + offset`; the caller launches without FP fusion.
    """
    if NESTED:
        c = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(ncode_ptr + c) * tl.load(nabs_ptr + blk // nb, mask=mask, other=0.0)
        return tl.where(mask, scale + tl.load(offset_ptr), 0.0)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, n_bytes, n_blocks,
                      ncode_ptr, nabs_ptr, offset_ptr, nb,
                      BS: tl.constexpr, BPT: tl.constexpr, NESTED: tl.constexpr, OUT_KIND: tl.constexpr):
    """One program = BPT whole blocks of BS elements: a (BPT, BS/2) tile of packed bytes."""
    HB: tl.constexpr = BS // 2
    blk0 = tl.program_id(0).to(tl.int64) * BPT
    rows = tl.arange(0, BPT)
    blk = blk0 + rows
    scale = _block_scales(absmax_ptr, blk, blk < n_blocks, ncode_ptr, nabs_ptr, offset_ptr, nb, NESTED)

    byte0 = blk0 * HB
    bytes_left = tl.minimum(n_bytes - byte0, BPT * HB).to(tl.int32)
    local_b = rows[:, None] * HB + tl.arange(0, HB)[None, :]
    packed = tl.load(packed_ptr + byte0 + local_b, mask=local_b < bytes_left, other=0)
    v_hi = tl.load(code_ptr + (packed >> 4)) * scale[:, None]  # element 2i: high nibble
    v_lo = tl.load(code_ptr + (packed & 15)) * scale[:, None]
    vals = tl.reshape(tl.join(_from_f32(v_hi, OUT_KIND), _from_f32(v_lo, OUT_KIND)), (BPT, BS))

    e0 = blk0 * BS
    elems_left = tl.minimum(n - e0, BPT * BS).to(tl.int32)
    local_e = rows[:, None] * BS + tl.arange(0, BS)[None, :]
    tl.store(out_ptr + e0 + local_e, vals, mask=local_e < elems_left)


@triton.jit
def quantize_kernel(x_ptr, bounds_ptr, order_ptr, packed_ptr, absmax_ptr, n, n_bytes, n_blocks,
                    BS: tl.constexpr, BPT: tl.constexpr, IN_KIND: tl.constexpr, HAS_TAIL: tl.constexpr):
    """One program = BPT blocks: absmax, scale, nearest level, pack two codes per byte."""
    HB: tl.constexpr = BS // 2
    blk0 = tl.program_id(0).to(tl.int64) * BPT
    rows = tl.arange(0, BPT)
    blk = blk0 + rows

    e0 = blk0 * BS
    elems_left = tl.minimum(n - e0, BPT * BS).to(tl.int32)
    local_e = rows[:, None] * BS + tl.arange(0, BS)[None, :]
    x = _to_f32(tl.load(x_ptr + e0 + local_e, mask=local_e < elems_left, other=0), IN_KIND)  # pad: +0.0

    absmax = tl.max(tl.abs(x), axis=1)
    clamped = tl.maximum(absmax, tl.full((BPT,), TINY_BITS, tl.int32).to(tl.float32, bitcast=True))
    scaled = x * tl.math.div_rn(tl.full((BPT,), 1.0, tl.float32), clamped)[:, None]  # full blocks
    if HAS_TAIL:
        tail = n_blocks - 1
        if blk0 + BPT > tail:  # this program holds the partial block: divide, store the clamped absmax
            is_tail = blk == tail
            divided = tl.math.div_rn(x, tl.broadcast_to(clamped[:, None], (BPT, BS)))
            scaled = tl.where(is_tail[:, None], divided, scaled)
            absmax = tl.where(is_tail, clamped, absmax)
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)

    rank = tl.zeros((BPT, BS), dtype=tl.int32)
    for i in tl.static_range(15):  # midpoints strictly below the value (ties -> lower level)
        rank += (tl.load(bounds_ptr + i) < scaled).to(tl.int32)
    codes = tl.load(order_ptr + rank)
    hi, lo = tl.split(tl.reshape(codes, (BPT, HB, 2)))
    packed = (hi << 4) | lo

    byte0 = blk0 * HB
    bytes_left = tl.minimum(n_bytes - byte0, BPT * HB).to(tl.int32)
    local_b = rows[:, None] * HB + tl.arange(0, HB)[None, :]
    tl.store(packed_ptr + byte0 + local_b, packed, mask=local_b < bytes_left)
    tl.store(absmax_ptr + blk, absmax, mask=blk < n_blocks)


@triton.jit
def _unpair(pairs, X_KIND: tl.constexpr):
    """x loaded two elements at a time (int64 for fp32, int32 for bf16/fp16) -> (x[2j], x[2j+1]) in fp32."""
    if X_KIND == 0:
        even = pairs.to(tl.int32).to(tl.float32, bitcast=True)
        odd = (pairs >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    elif X_KIND == 1:
        even = (pairs << 16).to(tl.float32, bitcast=True)
        odd = (pairs & -65536).to(tl.float32, bitcast=True)
    else:
        even = pairs.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        odd = (pairs >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return even, odd


@triton.jit
def gemv_even_kernel(xpair_ptr, packed_ptr, absmax_ptr, code_ptr, out_ptr, rows, n_out, K,
                     ncode_ptr, nabs_ptr, offset_ptr, nb,
                     BS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                     ROWS_P2: tl.constexpr, NESTED: tl.constexpr, X_KIND: tl.constexpr):
    """y[r, o] = sum_k x[r, k] * W[o, k] for even K: element pairs (k, k+1) share a byte.

    One program = BLOCK_N output features, looping over K in chunks of BLOCK_K = G groups of GROUP
    elements (HG bytes). A group is known to lie in one block (GROUP is a power of two dividing K and
    BS; 2 always works for even K), so one scale is decoded per (feature, group). x is read as pairs
    (x[2j], x[2j+1]) through an int64 (fp32) or int32 (bf16/fp16) view. Products accumulate
    elementwise (explicit FMAs) in a (BLOCK_N, [ROWS_P2,] G, HG) fp32 tile, reduced once at the end:
    no cross-thread reduction inside the loop.
    """
    G: tl.constexpr = BLOCK_K // GROUP
    HG: tl.constexpr = GROUP // 2
    o = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = o < n_out
    row_flat = o.to(tl.int64) * K  # flat index of W[o, 0] (even)
    half_k = K // 2
    r = tl.arange(0, ROWS_P2)
    g = tl.arange(0, G)
    h = tl.arange(0, HG)
    gh = g[:, None] * HG + h[None, :]  # byte of the chunk, (G, HG)
    if ROWS_P2 == 1:
        acc = tl.zeros((BLOCK_N, G, HG), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, ROWS_P2, G, HG), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        jb = k0 // 2 + gh  # pair index within a row
        j_ok = jb < half_k
        b_ok = o_ok[:, None, None] & j_ok[None, :, :]
        packed = tl.load(packed_ptr + (row_flat // 2)[:, None, None] + jb[None, :, :], mask=b_ok, other=0)
        s_ok = o_ok[:, None] & ((k0 + g * GROUP) < K)[None, :]
        blk = (row_flat[:, None] + (k0 + g * GROUP)[None, :]) // BS
        scale = _block_scales(absmax_ptr, blk, s_ok, ncode_ptr, nabs_ptr, offset_ptr, nb, NESTED)[:, :, None]
        w_hi = tl.load(code_ptr + (packed >> 4)) * scale  # W[o, 2 jb]
        w_lo = tl.load(code_ptr + (packed & 15)) * scale  # W[o, 2 jb + 1]

        if ROWS_P2 == 1:  # decoding: no row axis, so the weight tile keeps its load layout
            x_even, x_odd = _unpair(tl.load(xpair_ptr + jb, mask=j_ok, other=0), X_KIND)
            acc = tl.fma(w_hi, x_even[None, :, :], acc)
            acc = tl.fma(w_lo, x_odd[None, :, :], acc)
        else:
            x_ok = (r < rows)[:, None, None] & j_ok[None, :, :]
            pairs = tl.load(xpair_ptr + (r * half_k)[:, None, None] + jb[None, :, :], mask=x_ok, other=0)
            x_even, x_odd = _unpair(pairs, X_KIND)
            acc = tl.fma(w_hi[:, None, :, :], x_even[None, :, :, :], acc)
            acc = tl.fma(w_lo[:, None, :, :], x_odd[None, :, :, :], acc)
    if ROWS_P2 == 1:
        y = tl.sum(tl.sum(acc, axis=2), axis=1)[:, None]
    else:
        y = tl.sum(tl.sum(acc, axis=3), axis=2)
    y_ptr = out_ptr + r[None, :] * n_out + o[:, None]
    tl.store(y_ptr, _from_f32(y, X_KIND), mask=o_ok[:, None] & (r < rows)[None, :])


@triton.jit
def gemv_any_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, out_ptr, rows, n_out, K,
                    ncode_ptr, nabs_ptr, offset_ptr, nb,
                    BS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    ROWS_P2: tl.constexpr, NESTED: tl.constexpr, X_KIND: tl.constexpr):
    """Same product for any K (odd K: weight rows start mid-byte): one nibble and scale per element."""
    o = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = o < n_out
    row_flat = o.to(tl.int64) * K
    r = tl.arange(0, ROWS_P2)
    r_ok = r < rows
    kx = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, ROWS_P2), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + kx) < K
        w_ok = o_ok[:, None] & k_ok[None, :]
        flat = row_flat[:, None] + (k0 + kx)[None, :]
        packed = tl.load(packed_ptr + flat // 2, mask=w_ok, other=0)
        q = tl.where((flat & 1) == 1, packed & 15, packed >> 4)
        scale = _block_scales(absmax_ptr, flat // BS, w_ok, ncode_ptr, nabs_ptr, offset_ptr, nb, NESTED)
        w = tl.load(code_ptr + q) * scale

        x_ok = r_ok[:, None] & k_ok[None, :]
        xt = _to_f32(tl.load(x_ptr + r[:, None] * K + (k0 + kx)[None, :], mask=x_ok, other=0), X_KIND)
        acc += tl.sum(w[:, None, :] * xt[None, :, :], axis=2)
    y_ptr = out_ptr + r[None, :] * n_out + o[:, None]
    tl.store(y_ptr, _from_f32(acc, X_KIND), mask=o_ok[:, None] & r_ok[None, :])
