/*
 * Fast CPU kernels for bitsandbytes-format 4-bit weights: dequantise, quantise, a fused
 * matrix-vector product that reads the packed bytes directly, and the decoding of double-quantised
 * (8-bit) block scales.
 *
 * Format (shared with bitsandbytes 0.50): element i of the flattened tensor is a 4-bit index into a
 * 16-entry fp32 codebook; element 2j lives in the HIGH nibble of byte j, element 2j+1 in the LOW
 * nibble. Elements are grouped in contiguous blocks of `blocksize`; block b has one fp32 scale
 * absmax[b]. Value = code[q] * absmax[b], computed in fp32, then rounded to the output dtype with
 * round-to-nearest-even (the rounding torch's `.to(dtype)` uses).
 *
 * Speed ideas:
 *   - Per block we build the 16 products code[k] * absmax[b] once (one vector multiply) and then
 *     only look values up: in fp32 with `vpermps` (16 x fp32 fit one zmm register), and for 16-bit
 *     outputs with `vpermw` on a table rounded once to bf16/fp16 and duplicated to 32 entries, so
 *     that bit 4 of an index does not matter. The products are the same fp32 products an
 *     element-wise kernel computes, so results stay bit-identical.
 *   - 16 packed bytes widen to 16 dwords d; (d >> 4) | (d << 16) then holds, as 32 words, the
 *     32 nibble indices in element order (high nibble first), ready for `vpermw`.
 *   - The matrix-vector product splits x into its even and odd columns once, so the high and low
 *     nibbles of each byte multiply contiguous x vectors without any interleaving.
 *   - VCVTNEPS2BF16 flushes subnormal inputs to zero, unlike torch; blocks whose products can be
 *     subnormal build their table with the scalar rounding instead.
 *
 * Everything has a portable scalar twin (used without AVX-512 and for ragged edges). OpenMP splits
 * blocks (or output rows) across threads; the caller passes the thread count.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <float.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QN_AVX512 1
#else
#define QN_AVX512 0
#endif

#if defined(__GNUC__)
#define QN_ALWAYS_INLINE __attribute__((always_inline))
#else
#define QN_ALWAYS_INLINE
#endif

enum { QN_F32 = 0, QN_BF16 = 1, QN_F16 = 2 };

/* Increment when a signature below changes; the Python loader checks it. */
int qn_abi_version(void) { return 4; }
int qn_has_avx512(void) { return QN_AVX512; }

/* ---------------------------------------------------------------- scalar conversions (RNE) */

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* The same rounding as a select instead of a branch, so loops over it vectorise. */
static inline uint16_t f32_to_bf16_select(float f) {
    uint32_t u = f32_bits(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, nan = (u >> 16) | 0x40u;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

static inline float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

static inline uint16_t f32_to_f16(float f) {
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;                 /* NaN */
    if (a >= 0x477ff000u) return sign | 0x7c00u;                /* rounds to >= 65520: Inf */
    if (a < 0x38800000u) {                                      /* below 2^-14: subnormal or 0 */
        if (a < 0x33000000u) return sign;                       /* below 2^-25: rounds to 0 */
        uint32_t mant = (a & 0x7fffffu) | 0x800000u;
        int shift = 126 - (int)(a >> 23);                       /* 14..24: mant >> shift */
        uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
        q += (rem > half) || (rem == half && (q & 1u));
        return sign | (uint16_t)q;
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;  /* rebias 127 -> 15, RNE */
    return sign | (uint16_t)(r >> 13);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return bits_f32(sign | 0x7f800000u | (m << 13));
    if (e == 0) return (m == 0) ? bits_f32(sign) : (sign ? -1.0f : 1.0f) * ldexpf((float)m, -24);
    return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

static inline float load_as_f32(const void *x, int dtype, int64_t i) {
    if (dtype == QN_BF16) return bf16_to_f32(((const uint16_t *)x)[i]);
    if (dtype == QN_F16) return f16_to_f32(((const uint16_t *)x)[i]);
    return ((const float *)x)[i];
}

static inline void store_from_f32(void *out, int dtype, int64_t i, float v) {
    if (dtype == QN_BF16) ((uint16_t *)out)[i] = f32_to_bf16(v);
    else if (dtype == QN_F16) ((uint16_t *)out)[i] = f32_to_f16(v);
    else ((float *)out)[i] = v;
}

/* Rounds v to `dtype` and back (the value a dequantised weight of that dtype holds). */
static inline float round_through(float v, int dtype) {
    if (dtype == QN_BF16) return bf16_to_f32(f32_to_bf16(v));
    if (dtype == QN_F16) return f16_to_f32(f32_to_f16(v));
    return v;
}

static inline int nibble(const uint8_t *packed, int64_t i) {
    uint8_t b = packed[i >> 1];
    return (i & 1) ? (b & 0x0f) : (b >> 4);
}

static inline int set_threads(int nthreads) { return nthreads > 0 ? nthreads : 1; }

/* Tensors smaller than this (elements) run on the calling thread: waking the team costs more. */
#define QN_PARALLEL_MIN 32768

/* Below this scale a code*absmax product may be an fp32 subnormal (|code| >= 2^-8 for non-zero
 * codes of every shipped table, and a generous margin): such blocks use the scalar table. */
#define QN_TINY_ABSMAX 0x1p-100f

#if QN_AVX512
/* ------------------------------------------------------------------ AVX-512 building blocks */

/* 16 bytes -> 32 word indices in element order (high nibble first), low 4 bits significant. */
static inline __m512i nibble_words(const uint8_t *bytes) {
    __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
    return _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(d, 16));
}

/* Table of 16 products rounded to a 16-bit dtype, duplicated to 32 words for vpermw. */
static inline __m512i table16(__m512 prod, float scale, const float *code, int dtype) {
    __m256i h;
    if (fabsf(scale) < QN_TINY_ABSMAX) {
        uint16_t t[16];
        for (int k = 0; k < 16; k++) {
            float v = code[k] * scale;
            t[k] = dtype == QN_BF16 ? f32_to_bf16(v) : f32_to_f16(v);
        }
        h = _mm256_loadu_si256((const __m256i *)t);
    } else if (dtype == QN_F16) {
        h = _mm512_cvtps_ph(prod, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
#ifdef __AVX512BF16__
        h = (__m256i)_mm512_cvtneps_pbh(prod);
#else
        /* RNE on the fp32 bits, vectorised: (u + 0x7fff + ((u >> 16) & 1)) >> 16. */
        __m512i u = _mm512_castps_si512(prod);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
        h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
#endif
    }
    return _mm512_broadcast_i64x4(h);
}

/* Elements i..i+15 of x (fp32 / bf16 / fp16) as fp32 (exact). */
static inline __m512 load16_f32(const void *x, int dtype, int64_t i) {
    if (dtype == QN_F32) return _mm512_loadu_ps((const float *)x + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
    if (dtype == QN_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Widens a 16-bit table back to fp32 (the weight values a bf16/fp16 dequantisation holds). */
static inline __m512 table_rounded_f32(__m512 prod, float scale, const float *code, int dtype) {
    if (dtype == QN_F32) return prod;
    __m256i h = _mm512_castsi512_si256(table16(prod, scale, code, dtype));
    if (dtype == QN_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

/* ------------------------------------------------------------------------------ dequantise */

static void dequant_block_scalar(const uint8_t *packed, const float *code, float scale,
                                 int64_t i, int64_t end, void *out, int dtype) {
    for (; i < end; i++) store_from_f32(out, dtype, i, code[nibble(packed, i)] * scale);
}

void qn_dequantize_4bit(const uint8_t *packed, const float *absmax, const float *code, int64_t n,
                        int64_t blocksize, void *out, int dtype, int nthreads) {
    int64_t nblocks = (n + blocksize - 1) / blocksize;
#if QN_AVX512
    __m512 codev = _mm512_loadu_ps(code);
    __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(8));
#endif
#pragma omp parallel for schedule(static) num_threads(set_threads(nthreads)) if(n >= QN_PARALLEL_MIN)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t i = b * blocksize, end = i + blocksize < n ? i + blocksize : n;
        float scale = absmax[b];
#if QN_AVX512
        if ((i & 1) == 0) {
            __m512 prod = _mm512_mul_ps(codev, _mm512_set1_ps(scale));
            if (dtype == QN_F32) {
                float *o = (float *)out;
                for (; i + 32 <= end; i += 32) {
                    __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(packed + i / 2)));
                    __m512 ve = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), prod);
                    __m512 vo = _mm512_permutexvar_ps(d, prod);
                    _mm512_storeu_ps(o + i, _mm512_permutex2var_ps(ve, lo_idx, vo));
                    _mm512_storeu_ps(o + i + 16, _mm512_permutex2var_ps(ve, hi_idx, vo));
                }
            } else {
                __m512i tbl = table16(prod, scale, code, dtype);
                uint16_t *o = (uint16_t *)out;
                for (; i + 32 <= end; i += 32)
                    _mm512_storeu_si512(o + i, _mm512_permutexvar_epi16(nibble_words(packed + i / 2), tbl));
            }
        }
#endif
        dequant_block_scalar(packed, code, scale, i, end, out, dtype);
    }
}

/* Double-quantised scales: out[i] = code[q[i]] * absmax[i / blocksize] + offset, in fp32 with two
 * roundings (the build uses -ffp-contract=off, so no fused multiply-add changes the bits). */
void qn_dequantize_8bit(const uint8_t *q, const float *code, const float *absmax, int64_t n,
                        int64_t blocksize, float offset, float *out, int nthreads) {
    int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static) num_threads(set_threads(nthreads)) if(n >= QN_PARALLEL_MIN)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t end = (b + 1) * blocksize < n ? (b + 1) * blocksize : n;
        float scale = absmax[b];
        for (int64_t i = b * blocksize; i < end; i++) out[i] = code[q[i]] * scale + offset;
    }
}

/* -------------------------------------------------------------------------------- quantise */

/* bucketize(v, bounds, right=False) = number of bounds strictly below v (bounds sorted). */
static inline int rank_scalar(float v, const float *bounds) {
    int r = 0;
    for (int step = 8; step; step >>= 1)
        if (bounds[r + step - 1] < v) r += step;
    return r;
}

static inline int quant_scalar(float v, float mul, float div, const float *bounds, const uint8_t *order) {
    float s = div > 0.0f ? v / div : v * mul;
    return order[rank_scalar(s, bounds)];
}

/*
 * bitsandbytes' rule, kept exactly: full blocks scale by x * (1 / max(absmax, 1e-38)); the partial
 * last block divides by max(absmax, 1e-38) and stores that clamped absmax; full blocks store the
 * unclamped one. Clamping to [-1, 1] cannot change a rank (all bounds lie inside), so it is skipped.
 * An odd element count is padded with a 0 (rank of 0.0). Returns the number of NaN / Inf inputs
 * (counted during the absmax pass, so callers need no separate scan); outputs are then undefined.
 */
int64_t qn_quantize_4bit(const void *x, int dtype, int64_t n, int64_t blocksize, const float *bounds,
                         const uint8_t *order, uint8_t *packed, float *absmax, int nthreads) {
    int64_t nblocks = (n + blocksize - 1) / blocksize, nonfinite = 0;
#if QN_AVX512
    __m512 boundv = _mm512_mask_loadu_ps(_mm512_set1_ps(INFINITY), 0x7fff, bounds);
    __m512i orderv = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)order));
#endif
#pragma omp parallel for schedule(static) num_threads(set_threads(nthreads)) if(n >= QN_PARALLEL_MIN) reduction(+ : nonfinite)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t start = b * blocksize, end = start + blocksize < n ? start + blocksize : n;
        int partial = end - start < blocksize;
        float am = 0.0f;
        int64_t i = start;
#if QN_AVX512
        __m512 amv = _mm512_setzero_ps();
        for (; i + 16 <= end; i += 16) {
            __m512 a = _mm512_abs_ps(load16_f32(x, dtype, i));
            nonfinite += __builtin_popcount(_mm512_cmp_ps_mask(a, _mm512_set1_ps(FLT_MAX), _CMP_NLE_UQ));
            amv = _mm512_max_ps(amv, a);
        }
        am = _mm512_reduce_max_ps(amv);
#endif
        for (; i < end; i++) {
            float a = fabsf(load_as_f32(x, dtype, i));
            nonfinite += !(a <= FLT_MAX);
            am = fmaxf(am, a);
        }
        float clamped = am > 1e-38f ? am : 1e-38f;
        absmax[b] = partial ? clamped : am;
        float mul = 1.0f / clamped, div = partial ? clamped : 0.0f;
        i = start;
#if QN_AVX512
        if (!partial && (start & 1) == 0) {
            __m512 mulv = _mm512_set1_ps(mul);
            for (; i + 16 <= end; i += 16) {
                __m512 s = _mm512_mul_ps(load16_f32(x, dtype, i), mulv);
                __m512i r = _mm512_setzero_si512();
                for (int step = 8; step; step >>= 1) {
                    __m512i cand = _mm512_add_epi32(r, _mm512_set1_epi32(step));
                    __m512 bnd = _mm512_permutexvar_ps(_mm512_sub_epi32(cand, _mm512_set1_epi32(1)), boundv);
                    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(bnd, s, _CMP_LT_OQ), cand);
                }
                __m512i q = _mm512_permutexvar_epi32(r, orderv);
                /* low dword of each qword <- (q[2j] << 4) | q[2j+1]; narrow qwords to bytes */
                __m512i pair = _mm512_or_si512(_mm512_slli_epi32(q, 4), _mm512_srli_epi64(q, 32));
                _mm_storel_epi64((__m128i *)(packed + i / 2), _mm512_cvtepi64_epi8(pair));
            }
        }
#endif
        for (; i < end; i += 2) {
            int hi = quant_scalar(load_as_f32(x, dtype, i), mul, div, bounds, order);
            int lo = i + 1 < end ? quant_scalar(load_as_f32(x, dtype, i + 1), mul, div, bounds, order)
                                 : order[rank_scalar(0.0f, bounds)];
            packed[i >> 1] = (uint8_t)((hi << 4) | lo);
        }
    }
    return nonfinite;
}

/* ------------------------------------------------------------------- matrix-vector product */

/*
 * y[r, o] = sum_k x[r, k] * W[o, k] for r < m, where W[o, k] is element o*K + k of the packed
 * weight, dequantised to `wdtype` (so the product equals x @ dequantize(W, wdtype).T up to fp32
 * summation order). x is fp32; xe / xo hold its even / odd columns (m x K/2) when K is even.
 * Blocks may straddle rows; each row is walked block segment by block segment.
 */
static inline QN_ALWAYS_INLINE void gemv_row(const float *x, const float *xe, const float *xo, const int m,
                            const uint8_t *packed, const float *absmax, const float *code,
                            int64_t blocksize, int64_t K, int64_t o, int wdtype, float *acc_out) {
    int64_t row0 = o * K, row1 = row0 + K, i = row0;
    float acc[8] = {0};
    (void)xe; (void)xo; /* only the vector path reads the split columns */
#if QN_AVX512
    __m512 ae[8], ao[8];
    for (int r = 0; r < m; r++) { ae[r] = _mm512_setzero_ps(); ao[r] = _mm512_setzero_ps(); }
    __m512 codev = _mm512_loadu_ps(code);
    int64_t Kh = K / 2;
#endif
    for (int64_t b = row0 / blocksize, next = (b + 1) * blocksize; i < row1; b++, next += blocksize) {
        int64_t bend = next < row1 ? next : row1;
        float scale = absmax[b];
#if QN_AVX512
        if (xe && (i & 1) == 0 && i + 32 <= bend) {
            __m512 tbl = table_rounded_f32(_mm512_mul_ps(codev, _mm512_set1_ps(scale)), scale, code, wdtype);
            for (; i + 32 <= bend; i += 32) {
                __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(packed + i / 2)));
                __m512 we = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), tbl);
                __m512 wo = _mm512_permutexvar_ps(d, tbl);
                int64_t j = (i - row0) / 2;
                for (int r = 0; r < m; r++) {
                    ae[r] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xe + r * Kh + j), ae[r]);
                    ao[r] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xo + r * Kh + j), ao[r]);
                }
            }
        }
#endif
        for (; i < bend; i++) {
            float w = round_through(code[nibble(packed, i)] * scale, wdtype);
            for (int r = 0; r < m; r++) acc[r] += w * x[r * K + (i - row0)];
        }
    }
#if QN_AVX512
    for (int r = 0; r < m; r++) acc[r] += _mm512_reduce_add_ps(_mm512_add_ps(ae[r], ao[r]));
#endif
    for (int r = 0; r < m; r++) acc_out[r] = acc[r];
}

/* Specialised per row count so the accumulators stay in registers. */
#define QN_GEMV_ROWS(M)                                                                           \
    static void gemv_rows_##M(const float *x, const float *xe, const float *xo, const uint8_t *p, \
                              const float *am, const float *code, int64_t bs, int64_t N, int64_t K, \
                              int wdtype, void *out, int odtype, int64_t out_row0, int nthreads) { \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(N * K >= QN_PARALLEL_MIN)")                        \
        for (int64_t o = 0; o < N; o++) {                                                         \
            float acc[8];                                                                         \
            gemv_row(x, xe, xo, M, p, am, code, bs, K, o, wdtype, acc);                           \
            for (int r = 0; r < M; r++) store_from_f32(out, odtype, (out_row0 + r) * N + o, acc[r]); \
        }                                                                                         \
    }
QN_GEMV_ROWS(1) QN_GEMV_ROWS(2) QN_GEMV_ROWS(3) QN_GEMV_ROWS(4)
QN_GEMV_ROWS(5) QN_GEMV_ROWS(6) QN_GEMV_ROWS(7) QN_GEMV_ROWS(8)

typedef void (*gemv_rows_fn)(const float *, const float *, const float *, const uint8_t *,
                             const float *, const float *, int64_t, int64_t, int64_t, int, void *,
                             int, int64_t, int);

/* Returns 0 on success, -1 if the scratch buffer for the split x could not be allocated. */
int qn_gemv_4bit(const float *x, int64_t m, const uint8_t *packed, const float *absmax,
                 const float *code, int64_t blocksize, int64_t N, int64_t K, int wdtype, void *out,
                 int odtype, int nthreads) {
    static const gemv_rows_fn fns[8] = {gemv_rows_1, gemv_rows_2, gemv_rows_3, gemv_rows_4,
                                        gemv_rows_5, gemv_rows_6, gemv_rows_7, gemv_rows_8};
    nthreads = set_threads(nthreads);
    float *split = NULL;
    if (K % 2 == 0) {
        split = (float *)malloc(sizeof(float) * (size_t)(m * K) + 64);
        if (!split) return -1;
        for (int64_t r = 0; r < m; r++)
            for (int64_t j = 0; j < K / 2; j++) {
                split[r * (K / 2) + j] = x[r * K + 2 * j];
                split[m * (K / 2) + r * (K / 2) + j] = x[r * K + 2 * j + 1];
            }
    }
    for (int64_t r0 = 0; r0 < m; r0 += 8) {
        int64_t rows = m - r0 < 8 ? m - r0 : 8;
        const float *xe = split ? split + r0 * (K / 2) : NULL;
        const float *xo = split ? split + m * (K / 2) + r0 * (K / 2) : NULL;
        fns[rows - 1](x + r0 * K, xe, xo, packed, absmax, code, blocksize, N, K, wdtype, out,
                      odtype, r0, nthreads);
    }
    free(split);
    return 0;
}

/* --------------------------------------------------------------- seeded dropout (LoRA input) */
/* out[i] = keep(i) ? round(x[i] * scale) : 0,
 * keep(i) = mix(seed, i) >= threshold, mix a 32-bit integer hash of the index and the 64-bit seed.
 * The mask is a pure function of (seed, i): the backward pass calls this again on the gradient
 * with the same seed instead of storing a mask, and any thread split gives the same bits. A
 * 32-bit threshold of p * 2^32 drops each element with probability p (to within 2^-32). */
static inline uint32_t qn_mix(uint64_t seed, uint64_t i) {
    /* Two 32-bit finalisers (murmur3's fmix32, then "lowbias32"): 32-bit multiplies vectorise. */
    uint32_t h = ((uint32_t)i * 0x9E3779B9u) ^ (uint32_t)seed ^ ((uint32_t)(i >> 32) * 0x85EBCA6Bu);
    h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16;
    h ^= (uint32_t)(seed >> 32);
    h ^= h >> 16; h *= 0x7FEB352Du; h ^= h >> 15; h *= 0x846CA68Bu; h ^= h >> 16;
    return h;
}

/* One loop per dtype, so the compiler vectorises each (the dtype test is outside the loop). */
#define QN_DROPOUT_LOOP(LOAD, STORE)                                                            \
    _Pragma("omp parallel for schedule(static) num_threads(set_threads(nthreads)) if(n >= QN_PARALLEL_MIN)") \
    for (int64_t i = 0; i < n; i++) {                                                           \
        float v = qn_mix(seed, (uint64_t)i) >= threshold ? (LOAD) * scale : 0.0f;              \
        STORE;                                                                                  \
    }

void qn_dropout(const void *x, void *out, int dtype, int64_t n, uint64_t seed, uint32_t threshold,
                float scale, int nthreads) {
    if (dtype == QN_BF16) {
        const uint16_t *xb = (const uint16_t *)x;
        uint16_t *ob = (uint16_t *)out;
        QN_DROPOUT_LOOP(bf16_to_f32(xb[i]), ob[i] = f32_to_bf16_select(v))
    } else if (dtype == QN_F16) {
        QN_DROPOUT_LOOP(load_as_f32(x, QN_F16, i), store_from_f32(out, QN_F16, i, v))
    } else {
        const float *xf = (const float *)x;
        float *of = (float *)out;
        QN_DROPOUT_LOOP(xf[i], of[i] = v)
    }
}
