/* Blockwise 4-bit (NF4 / FP4) dequantize for CPU, called through ctypes by deltatune.quant._native.
 *
 * Bit-identical to bitsandbytes and to deltatune's pure-PyTorch path (nf4.py): the block scale
 * is absmax[b], or with double quantization nested_code[q8[b]] * nested_absmax[b / 256] + offset
 * (two fp32 roundings, never fused: built with -ffp-contract=off); every output is then
 * code[q] * scale computed once in fp32 and rounded once (nearest even) to the output type.
 * Packing: two codes per byte, the first element in the high nibble.
 *
 * Why a kernel: eager PyTorch needs a lookup pass and a multiply pass with a temporary between
 * them (~1.8x the time of writing the output); here each block builds its 16 scaled values once
 * and the inner loop is table lookups: vpermps / vpermw (AVX-512), pshufb on byte planes (AVX2,
 * SSSE3), picked at run time, or plain C on other CPUs.  All paths give the same bits (tested
 * against each other and against PyTorch in tests/quant/test_native.py).
 */
#include <stdint.h>
#include <pthread.h>
#include <string.h>

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* fp32 -> bf16, round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16). */
static inline uint16_t to_bf16(float f) {
    uint32_t u = bits_of(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* fp32 -> IEEE fp16, round to nearest even, subnormals and overflow to inf included
 * (Maratyszcza's FP16 library, which c10::Half uses without F16C). */
static inline uint16_t to_fp16(float f) {
    const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
    float base = ((f < 0 ? -f : f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = bits_of(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xff000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = float_of((bias >> 1) + 0x07800000u) + base;
    const uint32_t b = bits_of(base);
    const uint32_t nonsign = ((b >> 13) & 0x00007c00u) + (b & 0x00000fffu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}

/* Everything one call needs; blocks are indexed globally so threads can take any range. */
typedef struct {
    const uint8_t *pk;           /* (nblocks * bs / 2,) packed codes */
    const void *absmax;          /* (nblocks,) fp32, or uint8 codes when nested_code != NULL */
    const float *nested_code;    /* (256,) dynamic map, or NULL */
    const float *nested_absmax;  /* (ceil(nblocks / nested_bs),) */
    float offset;                /* mean subtracted before the nested quantization */
    int64_t nested_bs;
    const float *code;           /* (16,) 4-bit code values */
    void *out;                   /* (nblocks * bs,) fp32 / bf16 / fp16 */
    int64_t bs;
    int kind;                    /* 0 fp32, 1 bf16, 2 fp16 */
} dq_args;

static inline float block_scale(const dq_args *a, int64_t blk) {
    if (!a->nested_code) return ((const float *)a->absmax)[blk];
    /* nested_bs is 256 in every bitsandbytes state: a shift, not a 64-bit division per block */
    const int64_t nb = a->nested_bs == 256 ? blk >> 8 : blk / a->nested_bs;
    const float v = a->nested_code[((const uint8_t *)a->absmax)[blk]] * a->nested_absmax[nb];
    return v + a->offset;
}

static inline uint8_t *block_out(const dq_args *a, int64_t blk) {
    return (uint8_t *)a->out + blk * a->bs * (a->kind == 0 ? 4 : 2);
}

/* The 16 scaled values of one block as raw bits of the output type. */
static inline void block_table(const float *code, float s, int kind, uint32_t t[16]) {
    for (int i = 0; i < 16; ++i) {
        const float v = code[i] * s; /* the one fp32 rounding */
        t[i] = kind == 0 ? bits_of(v) : kind == 1 ? to_bf16(v) : to_fp16(v);
    }
}

/* Portable C for one block (other CPUs, and non-finite scales on the vector paths). */
static void scalar_block(const dq_args *a, int64_t blk) {
    const int64_t half = a->bs / 2;
    uint32_t t[16];
    block_table(a->code, block_scale(a, blk), a->kind, t);
    const uint8_t *p = a->pk + blk * half;
    if (a->kind == 0) { /* one 8-byte store = the two outputs of one byte */
        uint64_t *o = (uint64_t *)block_out(a, blk);
        for (int64_t j = 0; j < half; ++j) o[j] = (uint64_t)t[p[j] >> 4] | ((uint64_t)t[p[j] & 15] << 32);
    } else { /* one 4-byte store = the two outputs of one byte */
        uint32_t *o = (uint32_t *)block_out(a, blk);
        for (int64_t j = 0; j < half; ++j) o[j] = t[p[j] >> 4] | (t[p[j] & 15] << 16);
    }
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_SSSE3_PATH 1
/* SSSE3: a 16-entry byte table is one pshufb.  Each output byte plane (2 for 16-bit outputs,
 * 4 for fp32) gets its own 16-byte table per block; 16 packed bytes -> 32 outputs per step:
 *   idx  = interleave(p >> 4, p & 15)          (32 codes, element order)
 *   byte plane k = pshufb(table_k, idx)        (k-th byte of each output)
 *   interleave the planes into 16/32-bit words and store. */
/* fp32 -> fp16 of 16 values with the F16C instruction (round to nearest even, as c10::Half). */
__attribute__((target("f16c"))) static void fp16_x16(const float *v, uint16_t *t) {
    for (int i = 0; i < 16; i += 4)
        _mm_storel_epi64((__m128i *)(t + i), _mm_cvtps_ph(_mm_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT));
}

/* One block's byte planes: pl[k] holds byte k of the 16 scaled values (k < 4 for fp32, k < 2 for
 * 16-bit outputs).  Vectorised: this runs once per 32..4096 outputs, so on 64-element blocks a
 * scalar version costs as much as the lookups themselves. */
__attribute__((target("ssse3"))) static inline void block_planes(const float *code, float s, int kind,
                                                                 int f16c, __m128i pl[4]) {
    const __m128i s4 = _mm_castps_si128(_mm_set1_ps(s));
    __m128 v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm_mul_ps(_mm_loadu_ps(code + 4 * i), _mm_castsi128_ps(s4));
    if (kind == 0) {
        /* per vector: lane k = byte k of its 4 values; then a 4x4 transpose of 32-bit lanes. */
        const __m128i m = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        __m128i a[4];
        for (int i = 0; i < 4; ++i) a[i] = _mm_shuffle_epi8(_mm_castps_si128(v[i]), m);
        const __m128i t01l = _mm_unpacklo_epi32(a[0], a[1]), t01h = _mm_unpackhi_epi32(a[0], a[1]);
        const __m128i t23l = _mm_unpacklo_epi32(a[2], a[3]), t23h = _mm_unpackhi_epi32(a[2], a[3]);
        pl[0] = _mm_unpacklo_epi64(t01l, t23l);
        pl[1] = _mm_unpackhi_epi64(t01l, t23l);
        pl[2] = _mm_unpacklo_epi64(t01h, t23h);
        pl[3] = _mm_unpackhi_epi64(t01h, t23h);
        return;
    }
    __m128i w[2]; /* the 16 values as uint16: w[0] = values 0..7, w[1] = 8..15 */
    if (kind == 1 && s - s == 0) { /* bf16, finite scale: RNE by integer add, see to_bf16 */
        __m128i r[4];
        for (int i = 0; i < 4; ++i) {
            const __m128i u = _mm_castps_si128(v[i]);
            const __m128i odd = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
            /* arithmetic shift: sign-extended 16-bit values survive the signed-saturating pack */
            r[i] = _mm_srai_epi32(_mm_add_epi32(u, _mm_add_epi32(_mm_set1_epi32(0x7fff), odd)), 16);
        }
        w[0] = _mm_packs_epi32(r[0], r[1]);
        w[1] = _mm_packs_epi32(r[2], r[3]);
    } else {
        float f[16];
        uint16_t t[16];
        for (int i = 0; i < 4; ++i) _mm_storeu_ps(f + 4 * i, v[i]);
        if (kind == 2 && f16c) {
            fp16_x16(f, t);
        } else {
            for (int i = 0; i < 16; ++i) t[i] = kind == 1 ? to_bf16(f[i]) : to_fp16(f[i]);
        }
        w[0] = _mm_loadu_si128((const __m128i *)t);
        w[1] = _mm_loadu_si128((const __m128i *)(t + 8));
    }
    const __m128i m = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m128i a = _mm_shuffle_epi8(w[0], m), b = _mm_shuffle_epi8(w[1], m);
    pl[0] = _mm_unpacklo_epi64(a, b);
    pl[1] = _mm_unpackhi_epi64(a, b);
}

__attribute__((target("ssse3"))) static void dequant_ssse3(const dq_args *a, int64_t first, int64_t count) {
    const int64_t half = a->bs / 2; /* bytes per block: a multiple of 16 since bs >= 32 */
    const int kind = a->kind;
    const __m128i low4 = _mm_set1_epi8(0x0f);
    const int f16c = __builtin_cpu_supports("f16c");
    for (int64_t blk = first; blk < first + count; ++blk) {
        __m128i pl[4];
        block_planes(a->code, block_scale(a, blk), kind, f16c, pl);
        const uint8_t *p = a->pk + blk * half;
        uint8_t *o = block_out(a, blk);
        for (int64_t j = 0; j < half; j += 16) {
            const __m128i b = _mm_loadu_si128((const __m128i *)(p + j));
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4), lo = _mm_and_si128(b, low4);
            const __m128i idx[2] = {_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)};
            for (int h = 0; h < 2; ++h) { /* 16 outputs each */
                const __m128i b0 = _mm_shuffle_epi8(pl[0], idx[h]), b1 = _mm_shuffle_epi8(pl[1], idx[h]);
                const __m128i w_lo = _mm_unpacklo_epi8(b0, b1), w_hi = _mm_unpackhi_epi8(b0, b1);
                if (kind != 0) {
                    _mm_storeu_si128((__m128i *)o, w_lo);
                    _mm_storeu_si128((__m128i *)(o + 16), w_hi);
                    o += 32;
                } else {
                    const __m128i b2 = _mm_shuffle_epi8(pl[2], idx[h]), b3 = _mm_shuffle_epi8(pl[3], idx[h]);
                    const __m128i u_lo = _mm_unpacklo_epi8(b2, b3), u_hi = _mm_unpackhi_epi8(b2, b3);
                    _mm_storeu_si128((__m128i *)o, _mm_unpacklo_epi16(w_lo, u_lo));
                    _mm_storeu_si128((__m128i *)(o + 16), _mm_unpackhi_epi16(w_lo, u_lo));
                    _mm_storeu_si128((__m128i *)(o + 32), _mm_unpacklo_epi16(w_hi, u_hi));
                    _mm_storeu_si128((__m128i *)(o + 48), _mm_unpackhi_epi16(w_hi, u_hi));
                    o += 64;
                }
            }
        }
    }
}

/* AVX2: the same per 32 packed bytes (64 outputs), bs >= 64.  vpshufb and the unpacks work
 * within each 128-bit lane, so the low lane carries bytes 0..15 of the step and the high lane
 * bytes 16..31; permute2x128 restores element order before each store. */
__attribute__((target("avx2"))) static void dequant_avx2(const dq_args *a, int64_t first, int64_t count) {
    const int64_t half = a->bs / 2; /* a multiple of 32 since bs % 64 == 0 */
    const int kind = a->kind;
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const int f16c = __builtin_cpu_supports("f16c");
    for (int64_t blk = first; blk < first + count; ++blk) {
        __m128i pl4[4] = {_mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128()};
        block_planes(a->code, block_scale(a, blk), kind, f16c, pl4);
        __m256i pl[4];
        for (int k = 0; k < 4; ++k) pl[k] = _mm256_broadcastsi128_si256(pl4[k]);
        const uint8_t *p = a->pk + blk * half;
        uint8_t *o = block_out(a, blk);
        for (int64_t j = 0; j < half; j += 32) {
            const __m256i b = _mm256_loadu_si256((const __m256i *)(p + j));
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
            const __m256i lo = _mm256_and_si256(b, low4);
            /* idx[0]: elements 0..15 | 32..47, idx[1]: 16..31 | 48..63 */
            const __m256i idx[2] = {_mm256_unpacklo_epi8(hi, lo), _mm256_unpackhi_epi8(hi, lo)};
            if (kind != 0) {
                __m256i w[4]; /* w[2h]: elements 16h+0..7 | 32+16h+0..7, w[2h+1]: the next 8 */
                for (int h = 0; h < 2; ++h) {
                    const __m256i b0 = _mm256_shuffle_epi8(pl[0], idx[h]);
                    const __m256i b1 = _mm256_shuffle_epi8(pl[1], idx[h]);
                    w[2 * h] = _mm256_unpacklo_epi8(b0, b1);
                    w[2 * h + 1] = _mm256_unpackhi_epi8(b0, b1);
                }
                __m256i *o32 = (__m256i *)o;
                _mm256_storeu_si256(o32 + 0, _mm256_permute2x128_si256(w[0], w[1], 0x20));
                _mm256_storeu_si256(o32 + 1, _mm256_permute2x128_si256(w[2], w[3], 0x20));
                _mm256_storeu_si256(o32 + 2, _mm256_permute2x128_si256(w[0], w[1], 0x31));
                _mm256_storeu_si256(o32 + 3, _mm256_permute2x128_si256(w[2], w[3], 0x31));
                o += 128;
            } else {
                __m256i d[8]; /* d[4h + q]: elements 16h + 4q .. +3 | 32 + 16h + 4q .. +3 */
                for (int h = 0; h < 2; ++h) {
                    const __m256i b0 = _mm256_shuffle_epi8(pl[0], idx[h]);
                    const __m256i b1 = _mm256_shuffle_epi8(pl[1], idx[h]);
                    const __m256i b2 = _mm256_shuffle_epi8(pl[2], idx[h]);
                    const __m256i b3 = _mm256_shuffle_epi8(pl[3], idx[h]);
                    const __m256i w_lo = _mm256_unpacklo_epi8(b0, b1), w_hi = _mm256_unpackhi_epi8(b0, b1);
                    const __m256i u_lo = _mm256_unpacklo_epi8(b2, b3), u_hi = _mm256_unpackhi_epi8(b2, b3);
                    d[4 * h + 0] = _mm256_unpacklo_epi16(w_lo, u_lo);
                    d[4 * h + 1] = _mm256_unpackhi_epi16(w_lo, u_lo);
                    d[4 * h + 2] = _mm256_unpacklo_epi16(w_hi, u_hi);
                    d[4 * h + 3] = _mm256_unpackhi_epi16(w_hi, u_hi);
                }
                __m256i *o32 = (__m256i *)o;
                for (int q = 0; q < 8; q += 2) { /* elements 8*(q/2) .. : low lanes, then high lanes */
                    _mm256_storeu_si256(o32 + q / 2, _mm256_permute2x128_si256(d[q], d[q + 1], 0x20));
                    _mm256_storeu_si256(o32 + 4 + q / 2, _mm256_permute2x128_si256(d[q], d[q + 1], 0x31));
                }
                o += 256;
            }
        }
    }
}

/* AVX-512 (F + BW): the 16 scaled values fit one register, so no byte planes are needed:
 * vpermps looks up fp32 outputs by dword index, vpermw 16-bit outputs by word index.  Indices in
 * element order come from widening packed bytes: a byte b widened to a dword (qword) becomes the
 * word (dword) pair [b >> 4, b & 15] by (b >> 4) | (b & 15) << 16 (<< 32).  bf16 values stay in
 * the low half of 16 dwords and are looked up at word index 2q: no packing shuffle per block.
 * Non-finite scales (never produced by quantize, possible in a foreign checkpoint) take the
 * scalar path for exact NaN/inf bits. */
__attribute__((target("avx512f,avx512bw"))) static void dequant_avx512(const dq_args *a, int64_t first,
                                                                       int64_t count) {
    const int64_t half = a->bs / 2; /* a multiple of 32 since bs % 64 == 0 */
    const int kind = a->kind;
    const __m512 code = _mm512_loadu_ps(a->code);
    const __m512i low4_32 = _mm512_set1_epi32(0x0f), low4_64 = _mm512_set1_epi64(0x0f);
    /* word index of code q in the 16-bit table: 2q for bf16 (dword layout), q for fp16 */
    const int idx_shift = kind == 1 ? 1 : 0;
    for (int64_t blk = first; blk < first + count; ++blk) {
        const float s = block_scale(a, blk);
        if (s - s != 0) {
            scalar_block(a, blk);
            continue;
        }
        const __m512 t = _mm512_mul_ps(code, _mm512_set1_ps(s)); /* the one fp32 rounding */
        __m512i t16 = _mm512_setzero_si512();
        if (kind == 1) { /* bf16: round to nearest even by integer add, see to_bf16 */
            const __m512i u = _mm512_castps_si512(t);
            const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
            t16 = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
        } else if (kind == 2) {
            t16 = _mm512_zextsi256_si512(_mm512_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
        const uint8_t *p = a->pk + blk * half;
        uint8_t *o = block_out(a, blk);
        for (int64_t j = 0; j < half; j += 32) {
            if (kind == 0) {
                for (int q = 0; q < 4; ++q) { /* 8 bytes -> 16 outputs */
                    const __m512i b = _mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i *)(p + j + 8 * q)));
                    const __m512i idx = _mm512_or_si512(_mm512_srli_epi64(b, 4),
                                                        _mm512_slli_epi64(_mm512_and_si512(b, low4_64), 32));
                    _mm512_storeu_ps((float *)o + 16 * q, _mm512_permutexvar_ps(idx, t));
                }
                o += 256;
            } else {
                for (int q = 0; q < 2; ++q) { /* 16 bytes -> 32 outputs */
                    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + j + 16 * q)));
                    const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(b, 4),
                                                        _mm512_slli_epi32(_mm512_and_si512(b, low4_32), 16));
                    _mm512_storeu_si512((void *)(o + 64 * q),
                                        _mm512_permutexvar_epi16(_mm512_slli_epi16(idx, idx_shift), t16));
                }
                o += 128;
            }
        }
    }
}
#endif

/* Highest instruction set the dispatcher may use: 0 portable C, 1 SSSE3, 2 AVX2, 3 AVX-512.
 * Tests lower it to check every path on one machine; results must not depend on it. */
static int max_isa = 3;

int deltatune_set_max_isa(int level) {
    const int old = max_isa;
    max_isa = level;
    return old;
}

/* One thread's share: blocks [first, first + count). */
static void dequant_range(const dq_args *a, int64_t first, int64_t count) {
#ifdef HAVE_SSSE3_PATH
    if (max_isa >= 3 && a->bs % 64 == 0 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw")) {
        dequant_avx512(a, first, count);
        return;
    }
    if (max_isa >= 2 && a->bs % 64 == 0 && __builtin_cpu_supports("avx2")) {
        dequant_avx2(a, first, count);
        return;
    }
    if (max_isa >= 1 && a->bs % 32 == 0 && __builtin_cpu_supports("ssse3")) {
        dequant_ssse3(a, first, count);
        return;
    }
#endif
    for (int64_t blk = first; blk < first + count; ++blk) scalar_block(a, blk);
}

typedef struct {
    const dq_args *a;
    int64_t first, count;
} job_t;

static void *run_job(void *arg) {
    const job_t *j = (const job_t *)arg;
    dequant_range(j->a, j->first, j->count);
    return NULL;
}

#define MAX_THREADS 64
/* Entry point.  absmax is fp32, or uint8 codes when nested_code is not NULL (double quant).
 * Splits the blocks over `nthreads` threads (the caller's is one of them) when the tensor is
 * big enough (>= 2^20 outputs) for the hand-off not to matter.  Threads are created per call
 * rather than pooled: nothing survives a call, so nothing needs cleaning up at unload or fork,
 * and a parked pool measured no faster here (4M outputs, 2 threads: 0.32 ms either way).
 * Returns 0, or 1 for an unknown kind or a block size that is not even. */
int deltatune_dequant4bit(const uint8_t *pk, const void *absmax, const float *nested_code,
                          const float *nested_absmax, float offset, int64_t nested_bs,
                          const float *code, void *out, int64_t nblocks, int64_t bs, int kind,
                          int nthreads) {
    if (kind < 0 || kind > 2 || bs <= 0 || bs % 2 || (nested_code && nested_bs <= 0)) return 1;
    const dq_args a = {pk, absmax, nested_code, nested_absmax, offset, nested_bs, code, out, bs, kind};
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > nblocks) nthreads = (int)nblocks;
    if (nthreads <= 1 || nblocks * bs < ((int64_t)1 << 20)) {
        dequant_range(&a, 0, nblocks);
        return 0;
    }
    job_t jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    int64_t first = 0;
    for (int t = 0; t < nthreads; ++t) {
        const int64_t n = nblocks / nthreads + (t < nblocks % nthreads);
        jobs[t] = (job_t){&a, first, n};
        first += n;
    }
    for (int t = 1; t < nthreads; ++t) started[t] = pthread_create(&tid[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (int t = 1; t < nthreads; ++t) {
        if (started[t]) pthread_join(tid[t], NULL);
        else run_job(&jobs[t]); /* could not start a thread: do its share here */
    }
    return 0;
}
