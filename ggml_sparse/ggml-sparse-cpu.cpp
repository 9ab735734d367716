// llama-sparse: CPU kernels of the sparse FFN ops (include/ggml-sparse.h).
//
// Each op has a fast kernel and a reference (params->use_ref, what
// test-backend-ops compares against): the reference computes the dense result
// in double precision and applies the mask afterwards, so it shares no
// skipping or tiling logic with the fast kernel.
//
// Threading: every output element is summed in the same order whatever the
// thread count, so results do not depend on it. One thread computes each,
// except in down's fast paths: the two fixed halves of the rows are summed on
// their own (by one thread or two) and then added.
//
//   predict   rows of sign split in contiguous ranges; each thread packs the
//             signs of x itself (cheap) into its own slice of wdata
//   mul_mat   x converted once to the weight's vec_dot type (rows of x split
//             over threads, then a barrier); neuron rows dealt out in chunks
//             of SPARSE_ROW_CHUNK round-robin: neurons are stored hot-first,
//             so the active rows cluster at the start and a contiguous split
//             would leave one thread with most of the work. A thread gathers
//             its active rows and takes them four at a time where it has a
//             four-row kernel, one at a time otherwise: AVX512-VNNI row
//             kernels (Q4_0, Q4_1, Q8_0, Q4_K) that read rows as stored
//             against x laid out once per token under them, else AVX2 ones
//             (Q4_0, Q4_1, Q5_0, Q8_0; AVX-512: F16), else the type's vec_dot.
//             The kernels prefetch the rows ahead into L2 line by line as
//             they read; vec_dot's are prefetched whole, except when nearly
//             all of its long rows are active (the hardware prefetcher
//             follows that stream)
//   mask      elementwise, each token's row split in contiguous ranges
//   down      AVX-512 fast paths (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K,
//             F16, BF16, F32): the rows in two halves, the first summed into
//             dst and the second into wdata, added after a barrier. One
//             token's threads share out the (half, block-aligned column slice)
//             pairs, so two threads each stream one half's whole rows; a
//             batch's threads take a column slice of both halves. With
//             VNNI and VBMI (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K) each token sums 16 of its
//             active rows at a time in 32-bit integers, their coefficients h*d
//             rounded to bytes on a scale shared by the 16, in slabs of rows
//             that a batch's tokens take in turn (up to 4 at a time that have
//             the same active rows, each row quad unpacked once for them; a
//             prompt batch, more than GGML_SPARSE_MAX_SMALL_BATCH tokens, 32
//             rows at a time). In
//             float, one token streams each active row through 2048 output
//             columns whose sums stay in L1, the rows a few ahead prefetched
//             into L2; several tokens keep
//             64 columns of up to 6 tokens in registers, each block decoded
//             once for all of them, and sum every token in the one-token order.
//             Either way a token's sums are bit-identical alone and in a
//             batch (in integers: a small one). Other types: the output
//             columns split in block-aligned slices, a thread dequantizes
//             its slice of each active row of down_t once and adds it to
//             every token that uses the neuron.
//   MUL_MAT   hinted GGML_SPARSE_HINT_PLAIN_WEIGHT, Q4_0 (AVX2): x quantized
//             as ggml's repacked path does (token quads over threads, then a
//             barrier); the rows split in contiguous ranges of ~128 KB tiles
//             that a thread interleaves and runs ggml's repacked GEMM on.

// GCC 12's AVX-512 headers use an uninitialized vector as the don't-care source of
// several intrinsics (_mm512_permutexvar_ps, _mm512_castsi128_si512, ...) and warn
// wherever one is inlined (GCC PR 105593): hundreds of false warnings in this file.
// Silenced for the headers only; this file's own code keeps the warnings.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define GGML_COMMON_DECL_CPP
#include "ggml-common.h"

#include "ggml-sparse-common.h"
#include "ggml-sparse-cpu.h"
#include "ggml-sparse.h"

#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "ggml-cpu-impl.h"
#include "simd-mappings.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic pop
#endif

static constexpr int64_t SPARSE_ROW_CHUNK = 16;
static constexpr size_t  SPARSE_ALIGN     = 64;
static constexpr int     SPARSE_PREFETCH  = 4;  // down_t rows ahead, one token (4 and 8 alike, 2 slower)
static constexpr int64_t SPARSE_DOWN_SPAN = 64; // down_t 32-column blocks summed per pass over the rows, one token (32, 128 slower)
static constexpr int64_t SPARSE_DOWN_SLAB = 512; // down_t rows per slab: no integer group and no half (sparse_down_parts) crosses one
// skip-row product: weight bytes prefetched ahead, except for rows read by vec_dot when at least
// SPARSE_PREFETCH_DENSE of the rows are read and rows are at least SPARSE_PREFETCH_LONG_ROW bytes
// (a page): a dense run
static constexpr size_t  SPARSE_PREFETCH_BYTES    = 32768;
static constexpr double  SPARSE_PREFETCH_DENSE    = 0.9;
static constexpr size_t  SPARSE_PREFETCH_LONG_ROW = 4096;

// prefetch the line at p into L2 (the hardware prefetcher does not follow skipped rows)
static void sparse_prefetch(const void * p) {
    __builtin_prefetch(p, 0, 1);
}

// prefetch the lines of n bytes from p into L2
static void sparse_prefetch_l2(const void * p, size_t n) {
    for (uintptr_t a = (uintptr_t) p & ~(uintptr_t) 63; a < (uintptr_t) p + n; a += 64) {
        sparse_prefetch((const void *) a);
    }
}

static size_t sparse_pad(size_t n) {
    return (n + SPARSE_ALIGN - 1) / SPARSE_ALIGN * SPARSE_ALIGN;
}

// row of any weight type as floats (F32 has no to_float)
static void sparse_row_to_float(ggml_type type, const void * row, float * out, int64_t n) {
    if (type == GGML_TYPE_F32) {
        memcpy(out, row, n*sizeof(float));
    } else {
        ggml_get_type_traits(type)->to_float(row, out, n);
    }
}

// [i0, i1) of n for thread ith of nth
static void sparse_split(int64_t n, int ith, int nth, int64_t & i0, int64_t & i1) {
    i0 = n * ith / nth;
    i1 = n * (ith + 1) / nth;
}

// params[i] for token t (ggml-sparse.h: one column for all tokens or one per token)
static float sparse_param(const ggml_tensor * params, int i, int64_t t) {
    return *(const float *) ((const char *) params->data + i*sizeof(float) + ggml_sparse_param_col(params->ne[1], t)*params->nb[1]);
}

#if defined(__AVX2__)
// the 6-bit scales and mins of a Q4_K super-block's 8 sub-blocks (ggml's get_scale_min_k4) as
// bytes: 0..7 the scales, 8..15 the mins. Reads the 12 bytes and 4 beyond (in a block_q4_K, quants).
static __m128i sparse_scales_mins_k4(const uint8_t * scales) {
    const __m128i u  = _mm_loadu_si128((const __m128i *) scales);                          // u0, u1, u2
    const __m128i lo = _mm_and_si128(u, _mm_set1_epi8(0x3F));                               // sc[0], m[0]
    const __m128i u2 = _mm_srlv_epi32(_mm_shuffle_epi32(u, _MM_SHUFFLE(2, 2, 2, 2)), _mm_setr_epi32(0, 4, 0, 0));
    const __m128i hi = _mm_or_si128(_mm_and_si128(u2, _mm_set1_epi8(0x0F)),
                                    _mm_slli_epi32(_mm_and_si128(_mm_srli_epi32(u, 6), _mm_set1_epi8(0x03)), 4)); // sc[1], m[1]
    return _mm_unpacklo_epi32(lo, hi);
}
#endif

//
// GGML_OP_SPARSE_PREDICT
//

// bit j of word w of out is 1 iff x[32 w + j] < 0; padding bits 0
static void sparse_pack_signs(const float * x, int64_t n, uint32_t * out) {
    const int64_t n_w = (n + 31) / 32;
    for (int64_t w = 0; w < n_w; ++w) {
        uint32_t bits = 0;
        const int64_t j1 = std::min<int64_t>(32, n - 32*w);
        for (int64_t j = 0; j < j1; ++j) {
            bits |= (uint32_t) (x[32*w + j] < 0.0f) << j;
        }
        out[w] = bits;
    }
}

// popcount(a XOR b) over n_w 32-bit words
static int64_t sparse_xor_popcount(const uint32_t * a, const uint32_t * b, int64_t n_w) {
    int64_t n = 0;
    int64_t w = 0;
#if defined(__AVX512VPOPCNTDQ__) && defined(__AVX512F__)
    __m512i acc = _mm512_setzero_si512();
    for (; w + 16 <= n_w; w += 16) {
        const __m512i va = _mm512_loadu_si512((const void *) (a + w));
        const __m512i vb = _mm512_loadu_si512((const void *) (b + w));
        acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_xor_si512(va, vb)));
    }
    uint64_t lanes[8];
    _mm512_storeu_si512((void *) lanes, acc);
    for (uint64_t l : lanes) {
        n += (int64_t) l;
    }
#endif
    for (; w + 2 <= n_w; w += 2) {
        uint64_t va, vb;
        memcpy(&va, a + w, sizeof(va));
        memcpy(&vb, b + w, sizeof(vb));
        n += __builtin_popcountll(va ^ vb);
    }
    for (; w < n_w; ++w) {
        n += __builtin_popcount(a[w] ^ b[w]);
    }
    return n;
}

static void sparse_predict(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * sign = dst->src[0];
    const ggml_tensor * x    = dst->src[1];

    const int64_t n_embd = x->ne[0];
    const int64_t n_tok  = x->ne[1];
    const int64_t n_w    = sign->ne[0];
    const int64_t n_ff   = sign->ne[1];
    const ggml_tensor * p = dst->src[2];

    int64_t i0, i1;
    sparse_split(n_ff, params->ith, params->nth, i0, i1);

    if (params->use_ref) {
        // bit by bit, straight from the definition
        for (int64_t t = 0; t < n_tok; ++t) {
            const float * xt = (const float *) ((const char *) x->data + t*x->nb[1]);
            const float alpha = sparse_param(p, 0, t);
            for (int64_t i = i0; i < i1; ++i) {
                const uint32_t * row = (const uint32_t *) ((const char *) sign->data + i*sign->nb[1]);
                int64_t n_neg = 0;
                for (int64_t j = 0; j < n_embd; ++j) {
                    n_neg += (int64_t) ((row[j/32] >> (j%32)) & 1) != (int64_t) (xt[j] < 0.0f);
                }
                ((float *) dst->data)[t*n_ff + i] = ggml_sparse_predict_keep(alpha, n_embd, n_neg);
            }
        }
        return;
    }

    uint32_t * xs = (uint32_t *) ((char *) params->wdata + params->ith*sparse_pad(n_w*n_tok*sizeof(uint32_t)));
    for (int64_t t = 0; t < n_tok; ++t) {
        sparse_pack_signs((const float *) ((const char *) x->data + t*x->nb[1]), n_embd, xs + t*n_w);
    }
    for (int64_t i = i0; i < i1; ++i) {
        const uint32_t * row = (const uint32_t *) ((const char *) sign->data + i*sign->nb[1]);
        for (int64_t t = 0; t < n_tok; ++t) {
            const int64_t n_neg = sparse_xor_popcount(row, xs + t*n_w, n_w);
            ((float *) dst->data)[t*n_ff + i] = ggml_sparse_predict_keep(sparse_param(p, 0, t), n_embd, n_neg);
        }
    }
}

//
// GGML_OP_SPARSE_MUL_MAT
//

static bool sparse_active(const ggml_tensor * mask, int64_t i, int64_t t) {
    return mask == nullptr || *(const float *) ((const char *) mask->data + i*sizeof(float) + t*mask->nb[1]) != 0.0f;
}

static void sparse_mul_mat_ref(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * w    = dst->src[0];
    const ggml_tensor * x    = dst->src[1];
    const ggml_tensor * mask = dst->src[2];

    const int64_t n_embd = w->ne[0];
    const int64_t n_ff   = w->ne[1];
    const int64_t n_tok  = x->ne[1];

    int64_t i0, i1;
    sparse_split(n_ff, params->ith, params->nth, i0, i1);

    float * row = (float *) params->wdata + params->ith*(sparse_pad(n_embd*sizeof(float))/sizeof(float));
    for (int64_t i = i0; i < i1; ++i) {
        sparse_row_to_float(w->type, (const char *) w->data + i*w->nb[1], row, n_embd);
        for (int64_t t = 0; t < n_tok; ++t) {
            const float * xt = (const float *) ((const char *) x->data + t*x->nb[1]);
            double sum = 0.0;
            for (int64_t j = 0; j < n_embd; ++j) {
                sum += (double) row[j] * xt[j];
            }
            // dense, then masked
            ((float *) dst->data)[t*n_ff + i] = sparse_active(mask, i, t) ? (float) sum : 0.0f;
        }
    }
}

// Four rows at once (AVX2; Q4_0, Q4_1, Q5_0, Q8_0): out[r] = rows[r] . y. A one-row dot product is
// one chain of dependent multiply-adds; four independent chains share each block of y and keep
// the multiply-add units busy, as ggml's dense product does by blocking rows. nullptr: no such
// kernel for the type, use vec_dot row by row.
//
// While it reads rows[r] a kernel prefetches the same bytes of pf[r] into L2 (rows further down
// the list; pf = rows when there are none), one line per line read, so the prefetches keep pace
// with the reads instead of queueing a row's lines at once ahead of them.
typedef void (*sparse_dot4_t)(int64_t n, const char * const * rows, const char * const * pf, const void * y, float * out);

#if defined(__AVX2__)
// the 32 nibbles of a Q4 block in [0, 15]: low nibbles first, as ggml stores them
static __m256i sparse_nibbles(const uint8_t * qs) {
    const __m128i q = _mm_loadu_si128((const __m128i *) qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0F));
}

// acc + the sums of 4 adjacent products of unsigned u and signed s bytes in each 32-bit lane
static __m256i sparse_dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

static float sparse_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// the 32 quants of a Q4_0 block in [0, 15]
static __m256i sparse_quants(const block_q4_0 * x) {
    return sparse_nibbles(x->qs);
}

// the 32 quants of a Q5_0 block in [0, 31]: bit k of qh is weight k's 16 (byte k of a broadcast
// qh gets qh's byte k/8, then tests its bit k%8)
static __m256i sparse_quants(const block_q5_0 * x) {
    const __m256i spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    const __m256i bit    = _mm256_set1_epi64x(0x8040201008040201);
    uint32_t qh;
    memcpy(&qh, x->qh, sizeof(qh));
    const __m256i hb = _mm256_and_si256(bit, _mm256_shuffle_epi8(_mm256_set1_epi32((int) qh), spread));
    return _mm256_or_si256(sparse_nibbles(x->qs), _mm256_and_si256(_mm256_cmpeq_epi8(hb, bit), _mm256_set1_epi8(16)));
}

// Q4_0 (OFF 8) and Q5_0 (OFF 16) x Q8_0: sum (q - OFF) y = sum q y - OFF sum y, the second term
// once per block for all rows
template <typename block, int OFF>
static void sparse_dot4_offset(int64_t n, const char * const * rows, const char * const * pf, const void * vy, float * out) {
    const block_q8_0 * y = (const block_q8_0 *) vy;
    __m256 acc[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps() };
    for (int64_t ib = 0; ib < n/QK8_0; ++ib) {
        const __m256i qy  = _mm256_loadu_si256((const __m256i *) y[ib].qs);
        const __m256i off = _mm256_sub_epi32(_mm256_setzero_si256(), sparse_dpbusd(_mm256_setzero_si256(), _mm256_set1_epi8(OFF), qy));
        const float   dy  = GGML_CPU_FP16_TO_FP32(y[ib].d);
        for (int r = 0; r < 4; ++r) {
            const block * x = (const block *) rows[r] + ib;
            sparse_prefetch((const char *) ((const block *) pf[r] + ib));
            const __m256  p = _mm256_cvtepi32_ps(sparse_dpbusd(off, sparse_quants(x), qy));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(GGML_CPU_FP16_TO_FP32(x->d)*dy), p, acc[r]);
        }
    }
    for (int r = 0; r < 4; ++r) {
        out[r] = sparse_hsum(acc[r]);
    }
}

// Q4_1 x Q8_1: sum (d q + m) (dy y) = d dy sum q y + m (dy sum y), the last factor stored in y
static void sparse_dot4_q4_1(int64_t n, const char * const * rows, const char * const * pf, const void * vy, float * out) {
    const block_q8_1 * y = (const block_q8_1 *) vy;
    __m256 acc[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps() };
    float  sm[4]  = { 0.0f, 0.0f, 0.0f, 0.0f };
    for (int64_t ib = 0; ib < n/QK8_1; ++ib) {
        const __m256i qy = _mm256_loadu_si256((const __m256i *) y[ib].qs);
        const ggml_half * ds = (const ggml_half *) &y[ib]; // d, then s
        const float   dy = GGML_CPU_FP16_TO_FP32(ds[0]);
        const float   sy = GGML_CPU_FP16_TO_FP32(ds[1]);
        for (int r = 0; r < 4; ++r) {
            const block_q4_1 * x  = (const block_q4_1 *) rows[r] + ib;
            sparse_prefetch((const char *) ((const block_q4_1 *) pf[r] + ib));
            const ggml_half  * dm = (const ggml_half *) x; // d, then m
            const __m256 p = _mm256_cvtepi32_ps(sparse_dpbusd(_mm256_setzero_si256(), sparse_nibbles(x->qs), qy));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(GGML_CPU_FP16_TO_FP32(dm[0])*dy), p, acc[r]);
            sm[r] += GGML_CPU_FP16_TO_FP32(dm[1])*sy;
        }
    }
    for (int r = 0; r < 4; ++r) {
        out[r] = sparse_hsum(acc[r]) + sm[r];
    }
}

// Q8_0 x Q8_0: signed x signed as |x| x (y with x's sign)
static void sparse_dot4_q8_0(int64_t n, const char * const * rows, const char * const * pf, const void * vy, float * out) {
    const block_q8_0 * y = (const block_q8_0 *) vy;
    __m256 acc[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps() };
    for (int64_t ib = 0; ib < n/QK8_0; ++ib) {
        const __m256i qy = _mm256_loadu_si256((const __m256i *) y[ib].qs);
        const float   dy = GGML_CPU_FP16_TO_FP32(y[ib].d);
        for (int r = 0; r < 4; ++r) {
            const block_q8_0 * x  = (const block_q8_0 *) rows[r] + ib;
            sparse_prefetch((const char *) ((const block_q8_0 *) pf[r] + ib));
            const __m256i      qx = _mm256_loadu_si256((const __m256i *) x->qs);
            const __m256 p = _mm256_cvtepi32_ps(sparse_dpbusd(_mm256_setzero_si256(), _mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx)));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(GGML_CPU_FP16_TO_FP32(x->d)*dy), p, acc[r]);
        }
    }
    for (int r = 0; r < 4; ++r) {
        out[r] = sparse_hsum(acc[r]);
    }
}

#if defined(__AVX512F__)
// F16 x F16 (AVX-512): each 16 values of y converted once for the four rows, sums in F32 as in
// ggml's vec_dot_f16 (which converts both sides for every row)
static void sparse_dot4_f16(int64_t n, const char * const * rows, const char * const * pf, const void * vy, float * out) {
    const ggml_fp16_t * y = (const ggml_fp16_t *) vy;
    __m512  acc[4] = { _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps() };
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        const __m512 yv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (y + j)));
        for (int r = 0; r < 4; ++r) {
            if (j % 32 == 0) { // 64 bytes
                sparse_prefetch((const char *) ((const ggml_fp16_t *) pf[r] + j));
            }
            const __m256i w = _mm256_loadu_si256((const __m256i *) ((const ggml_fp16_t *) rows[r] + j));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtph_ps(w), yv, acc[r]);
        }
    }
    for (int r = 0; r < 4; ++r) {
        float sum = _mm512_reduce_add_ps(acc[r]);
        for (int64_t k = j; k < n; ++k) {
            sum += GGML_CPU_FP16_TO_FP32(((const ggml_fp16_t *) rows[r])[k]) * GGML_CPU_FP16_TO_FP32(y[k]);
        }
        out[r] = sum;
    }
}
#endif

static sparse_dot4_t sparse_dot4(ggml_type type) {
    switch (type) {
        case GGML_TYPE_Q4_0: return sparse_dot4_offset<block_q4_0, 8>;
        case GGML_TYPE_Q4_1: return sparse_dot4_q4_1;
        case GGML_TYPE_Q5_0: return sparse_dot4_offset<block_q5_0, 16>;
        case GGML_TYPE_Q8_0: return sparse_dot4_q8_0;
#if defined(__AVX512F__)
        case GGML_TYPE_F16:  return sparse_dot4_f16;
#endif
        default:             return nullptr;
    }
}
#else
static sparse_dot4_t sparse_dot4(ggml_type) {
    return nullptr;
}
#endif

// Rows read as they are stored, 64 bytes at a time (AVX512-VNNI and BW; Q4_0, Q4_1, Q8_0). In
// these types every 32-bit lane of a row holds quants of one block only, beside its header bytes
// (blocks are 18, 20 or 34 bytes: they start at a multiple of 2, the header is 2 or 4 bytes), so
// one dpbusd against x laid out byte for byte under the row sums whole lanes, and the lanes'
// scales come from the same bytes by one word permute: no shuffle to decode and none to sum a
// block, which is what limits a one-row dot product (ggml's vec_dot, ggml-cpu) and what ggml's
// repacked eight-row kernels avoid by interleaving rows, which sparse rows cannot be.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// x under each 64 bytes of a row (sparse_dot_prepare): sparse_dot_n_x<W> vectors, in order lo
// and (nibbles) hi, the values under each byte's low and high nibble (or under the byte), zero
// under headers and past the row; then per 32-bit lane off, the negated OFF times the sum of its
// values, d, its block's d, and (a min) s, Q8_1's s on the lane of its block's header, else 0
typedef __m512i sparse_dot_x;

// W: the block, x's block (act: Q8_1 for a type with a min, d q + m), whether each byte holds
// two quants (low nibble: value k, high: k + 16) or one (k), the header bytes before the quants
// and OFF (sum (q - OFF) y)
template <typename B, typename A, bool NIBBLES, int Q_OFF>
struct sparse_dot_type {
    using blk = B;
    using act = A;
    static constexpr bool      nibbles = NIBBLES;
    static constexpr int       head    = (int) sizeof(B) - (NIBBLES ? QK4_0/2 : QK8_0);
    static constexpr int       OFF     = Q_OFF;
    static constexpr bool      has_min = std::is_same_v<A, block_q8_1>;
};

using sparse_dot_q4_0 = sparse_dot_type<block_q4_0, block_q8_0, true,  8>;
using sparse_dot_q4_1 = sparse_dot_type<block_q4_1, block_q8_1, true,  0>;
using sparse_dot_q8_0 = sparse_dot_type<block_q8_0, block_q8_0, false, 128>; // q ^ 0x80 = q + 128

template <typename W>
static constexpr int sparse_dot_n_x = 3 + W::nibbles + W::has_min;

// per 64 bytes of a row, the word of each 32-bit lane's block header among the 128 bytes of the
// previous 64 and these: the same for every token, and periodic (PERIOD * 64 bytes hold whole
// blocks)
template <typename W>
struct sparse_dot_idx {
    static constexpr int64_t B      = sizeof(typename W::blk);
    static constexpr int64_t PERIOD = std::lcm(B, (int64_t) 64) / 64;
    __m512i idx[PERIOD];
    sparse_dot_idx() {
        for (int64_t z = 0; z < PERIOD; ++z) {
            alignas(64) int16_t w[32] = {};
            for (int l = 0; l < 16; ++l) {
                w[l] = (int16_t) (((64*z + 4*l) / B * B - 64*z)/2 + 32);
            }
            idx[z] = _mm512_load_si512(w);
        }
    }
};

// lay out y (n values in W::act: block_q8_0 or block_q8_1, d first, then Q8_1's s, then the
// quants) under rows of W
template <typename W>
static void sparse_dot_prepare(const void * vy, int64_t n, sparse_dot_x * xs) {
    using BY = typename W::act;
    constexpr int64_t B    = sizeof(typename W::blk);
    const BY *        y    = (const BY *) vy;
    const int64_t     nb   = n / QK8_0;
    const int64_t     n_xs = (nb*B + 63) / 64;
    for (int64_t z = 0; z < n_xs; ++z) {
        alignas(64) int8_t  lo[64] = {}, hi[64] = {};
        alignas(64) int32_t off[16];
        alignas(64) float   d[16], s[16];
        for (int l = 0; l < 16; ++l) {
            const int64_t p0 = 64*z + 4*l;
            const int64_t b  = p0 / B;
            int32_t sum = 0;
            for (int64_t p = p0; p < p0 + 4; ++p) {
                const int64_t k = p - b*B - W::head;
                if (b >= nb || k < 0 || k >= B - W::head) {
                    continue;
                }
                lo[p - 64*z] = y[b].qs[k];
                hi[p - 64*z] = W::nibbles ? y[b].qs[k + 16] : 0;
                sum += lo[p - 64*z] + hi[p - 64*z];
            }
            const ggml_half * ds = (const ggml_half *) &y[std::min(b, nb - 1)];
            off[l] = -W::OFF*sum;
            d[l]   = b < nb ? GGML_CPU_FP16_TO_FP32(ds[0]) : 0.0f;
            s[l]   = b < nb && p0 == b*B ? GGML_CPU_FP16_TO_FP32(ds[1]) : 0.0f;
        }
        sparse_dot_x * x = xs + z*sparse_dot_n_x<W>;
        *x++ = _mm512_load_si512(lo);
        if constexpr (W::nibbles) {
            *x++ = _mm512_load_si512(hi);
        }
        *x++ = _mm512_load_si512(off);
        *x++ = _mm512_castps_si512(_mm512_load_ps(d));
        if constexpr (W::has_min) {
            *x++ = _mm512_castps_si512(_mm512_load_ps(s));
        }
    }
}

// out[r] = rows[r] . x for R rows of n values, x laid out by sparse_dot_prepare
template <typename W, int R>
static void sparse_dot_rows(int64_t n, const char * const * rows, const char * const * pf, const void * vx, float * out) {
    const sparse_dot_x * xs = (const sparse_dot_x *) vx;
    static const sparse_dot_idx<W> tab;
    constexpr int   NX   = sparse_dot_n_x<W>;
    const int64_t   size = n/QK8_0*(int64_t) sizeof(typename W::blk); // all three: 32 values a block
    const int64_t   n_xs = (size + 63) / 64;
    const int64_t   rest = size - 64*(n_xs - 1);
    const __mmask64 tail = rest == 64 ? ~(__mmask64) 0 : ((__mmask64) 1 << rest) - 1;
    const __m512i   m4   = _mm512_set1_epi8(0x0F);
    __m512  acc[R];
    __m512i prev[R];
    for (int r = 0; r < R; ++r) {
        acc[r]  = _mm512_setzero_ps();
        prev[r] = _mm512_setzero_si512();
    }
    for (int64_t z = 0, zp = 0; z < n_xs; ++z, zp = zp + 1 == tab.PERIOD ? 0 : zp + 1) {
        const sparse_dot_x * x   = xs + z*NX;
        const __m512i        lo  = x[0];
        const __m512i        hi  = x[W::nibbles];
        const __m512i        off = x[1 + W::nibbles];
        const __m512         d   = _mm512_castsi512_ps(x[2 + W::nibbles]);
        const __m512i        idx = tab.idx[zp];
        for (int r = 0; r < R; ++r) {
            const char *  p = rows[r] + 64*z;
            sparse_prefetch(pf[r] + 64*z);
            const __m512i w = z + 1 < n_xs ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(tail, p);
            __m512i sum;
            if constexpr (W::nibbles) {
                sum = _mm512_dpbusd_epi32(off, _mm512_and_si512(w, m4), lo);
                sum = _mm512_dpbusd_epi32(sum, _mm512_and_si512(_mm512_srli_epi16(w, 4), m4), hi);
            } else {
                sum = _mm512_dpbusd_epi32(off, _mm512_xor_si512(w, _mm512_set1_epi8((char) 0x80)), lo);
            }
            const __m512i hd = _mm512_permutex2var_epi16(prev[r], idx, w);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(hd)), _mm512_mul_ps(_mm512_cvtepi32_ps(sum), d), acc[r]);
            if constexpr (W::has_min) {
                const __m512i hm = _mm512_permutex2var_epi16(prev[r], _mm512_add_epi16(idx, _mm512_set1_epi16(1)), w);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(hm)), _mm512_castsi512_ps(x[3 + W::nibbles]), acc[r]);
            }
            prev[r] = w;
        }
    }
    for (int r = 0; r < R; ++r) {
        out[r] = _mm512_reduce_add_ps(acc[r]);
    }
}

// Q4_K: a super-block of 256 values is 144 bytes, its 128 bytes of quants in 4 runs of 32, run j
// holding sub-block 2j in its low nibbles and 2j + 1 in its high ones. Under each 64 bytes of
// quants x holds the values of the low and of the high nibbles; maddubs sums pairs of products
// in 16 bits (at most 2*15*127), dpwssd times the sub-block's 6-bit scale into 32. x per
// super-block: those 4 vectors, then d_y*(sum of y) per sub-block in lanes 0..7 and d_y in 8.
static constexpr int SPARSE_DOT_Q4_K_X = 5;

static void sparse_dot_prepare_q4_K(const void * vy, int64_t n, sparse_dot_x * xs) {
    const block_q8_K * y = (const block_q8_K *) vy;
    for (int64_t ib = 0; ib < n/QK_K; ++ib) {
        sparse_dot_x * x = xs + ib*SPARSE_DOT_Q4_K_X;
        const int8_t * q = y[ib].qs;
        for (int h = 0; h < 2; ++h) { // quant bytes 64h..64h + 63: runs 2h and 2h + 1
            const int8_t * r = q + 128*h;
            x[2*h]     = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *) r)),
                                            _mm256_loadu_si256((const __m256i *) (r + 64)), 1);
            x[2*h + 1] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *) (r + 32))),
                                            _mm256_loadu_si256((const __m256i *) (r + 96)), 1);
        }
        alignas(64) float f[16] = {};
        for (int j = 0; j < 8; ++j) {
            f[j] = y[ib].d * (y[ib].bsums[2*j] + y[ib].bsums[2*j + 1]);
        }
        f[8] = y[ib].d;
        x[4] = _mm512_castps_si512(_mm512_load_ps(f));
    }
}

template <int R>
static void sparse_dot_rows_q4_K(int64_t n, const char * const * rows, const char * const * pf, const void * vx, float * out) {
    const sparse_dot_x * xs = (const sparse_dot_x *) vx;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    // the scale of each lane's sub-block, from the 8 scales in lanes 0..7: the low nibbles of
    // bytes 64h..64h + 63 are sub-blocks 4h (lanes 0..7) and 4h + 2 (8..15), the high ones 4h + 1, 4h + 3
    const __m512i sel[4] = {
        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
        _mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3),
        _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6),
        _mm512_setr_epi32(5, 5, 5, 5, 5, 5, 5, 5, 7, 7, 7, 7, 7, 7, 7, 7),
    };
    __m512 acc[R];
    __m256 accm[R];
    for (int r = 0; r < R; ++r) {
        acc[r]  = _mm512_setzero_ps();
        accm[r] = _mm256_setzero_ps();
    }
    for (int64_t ib = 0; ib < n/QK_K; ++ib) {
        const sparse_dot_x * x  = xs + ib*SPARSE_DOT_Q4_K_X;
        const __m512         fy = _mm512_castsi512_ps(x[4]);
        const float          dy = _mm512_cvtss_f32(_mm512_permutexvar_ps(_mm512_set1_epi32(8), fy));
        for (int r = 0; r < R; ++r) {
            const block_q4_K * b  = (const block_q4_K *) rows[r] + ib;
            const char       * bp = (const char *) ((const block_q4_K *) pf[r] + ib); // 144 bytes
            sparse_prefetch(bp);
            sparse_prefetch(bp + 64);
            sparse_prefetch(bp + 128);
            const ggml_half  * dd = (const ggml_half *) b; // d, then dmin
            const __m512i sm = _mm512_cvtepu8_epi32(sparse_scales_mins_k4(b->scales)); // lanes 0..7 scales, 8..15 mins
            const __m512i s2 = _mm512_or_si512(sm, _mm512_slli_epi32(sm, 16));         // each scale in both halves
            __m512i sum = _mm512_setzero_si512();
            for (int h = 0; h < 2; ++h) {
                const __m512i q  = _mm512_loadu_si512(b->qs + 64*h);
                const __m512i lo = _mm512_maddubs_epi16(_mm512_and_si512(q, m4), x[2*h]);
                const __m512i hi = _mm512_maddubs_epi16(_mm512_and_si512(_mm512_srli_epi16(q, 4), m4), x[2*h + 1]);
                sum = _mm512_dpwssd_epi32(sum, lo, _mm512_permutexvar_epi32(sel[2*h],     s2));
                sum = _mm512_dpwssd_epi32(sum, hi, _mm512_permutexvar_epi32(sel[2*h + 1], s2));
            }
            acc[r]  = _mm512_fmadd_ps(_mm512_set1_ps(GGML_CPU_FP16_TO_FP32(dd[0])*dy), _mm512_cvtepi32_ps(sum), acc[r]);
            const __m256 mins = _mm256_cvtepi32_ps(_mm512_extracti64x4_epi64(sm, 1));
            accm[r] = _mm256_fmadd_ps(_mm256_set1_ps(GGML_CPU_FP16_TO_FP32(dd[1])), _mm256_mul_ps(mins, _mm512_castps512_ps256(fy)), accm[r]);
        }
    }
    for (int r = 0; r < R; ++r) {
        __m128 m = _mm_add_ps(_mm256_castps256_ps128(accm[r]), _mm256_extractf128_ps(accm[r], 1));
        m = _mm_add_ps(m, _mm_movehl_ps(m, m));
        m = _mm_add_ss(m, _mm_movehdup_ps(m));
        out[r] = _mm512_reduce_add_ps(acc[r]) - _mm_cvtss_f32(m);
    }
}
#else
struct sparse_dot_x {};
#endif

// the kernels of a weight type: x laid out once per token (nullptr: x as converted to the
// type's vec_dot type), four rows sharing each load of x and one row (nullptr: none, vec_dot)
struct sparse_dot_kernels {
    void (*prepare)(const void * y, int64_t n, sparse_dot_x * xs);
    sparse_dot4_t four;
    sparse_dot4_t one;
};

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
template <typename W>
static sparse_dot_kernels sparse_dot_kernels_of() {
    return { sparse_dot_prepare<W>, sparse_dot_rows<W, 4>, sparse_dot_rows<W, 1> };
}
#endif

static sparse_dot_kernels sparse_dot_kernels_for(ggml_type type) {
    switch (type) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        case GGML_TYPE_Q4_0: return sparse_dot_kernels_of<sparse_dot_q4_0>();
        case GGML_TYPE_Q4_1: return sparse_dot_kernels_of<sparse_dot_q4_1>();
        case GGML_TYPE_Q8_0: return sparse_dot_kernels_of<sparse_dot_q8_0>();
        case GGML_TYPE_Q4_K: return { sparse_dot_prepare_q4_K, sparse_dot_rows_q4_K<4>, sparse_dot_rows_q4_K<1> };
#endif
        default:             return { nullptr, sparse_dot4(type), nullptr };
    }
}

// sparse_dot_x one token needs for rows of w: up to 5 per 64 bytes
static int64_t sparse_dot_n_vec(const ggml_tensor * w) {
    return (int64_t) (w->nb[1] + 63) / 64 * 5;
}

// where in wdata the row kernels' x goes: after x in the weight's vec_dot type, aligned
static size_t sparse_dot_x_offset(const ggml_tensor * w, int64_t n_tok) {
    return sparse_pad(ggml_row_size(ggml_get_type_traits_cpu(w->type)->vec_dot_type, w->ne[0])*n_tok);
}

static sparse_dot_x * sparse_dot_x_at(void * wdata, const ggml_tensor * w, int64_t n_tok) {
    const uintptr_t p = (uintptr_t) wdata + sparse_dot_x_offset(w, n_tok);
    return (sparse_dot_x *) ((p + SPARSE_ALIGN - 1) / SPARSE_ALIGN * SPARSE_ALIGN);
}

static void sparse_mul_mat(const ggml_compute_params * params, ggml_tensor * dst) {
    if (params->use_ref) {
        sparse_mul_mat_ref(params, dst);
        return;
    }

    const ggml_tensor * w    = dst->src[0];
    const ggml_tensor * x    = dst->src[1];
    const ggml_tensor * mask = dst->src[2];

    const int64_t n_embd = w->ne[0];
    const int64_t n_ff   = w->ne[1];
    const int64_t n_tok  = x->ne[1];

    const ggml_type_traits_cpu * traits = ggml_get_type_traits_cpu(w->type);
    const ggml_type vec_dot_type = traits->vec_dot_type;

    // x in the type the weight's dot product takes, and laid out for the row kernel if it has one
    const char * xq    = (const char *) x->data;
    size_t       xq_nb = x->nb[1];
    const sparse_dot_kernels rk = sparse_dot_kernels_for(w->type); // x is F32 (ggml_sparse_mul_mat)
    const int64_t  n_xs = sparse_dot_n_vec(w);
    sparse_dot_x * xs   = sparse_dot_x_at(params->wdata, w, n_tok);
    if (x->type != vec_dot_type) {
        const ggml_from_float_t from_float = ggml_get_type_traits_cpu(vec_dot_type)->from_float;
        xq_nb = ggml_row_size(vec_dot_type, n_embd);
        for (int64_t t = params->ith; t < n_tok; t += params->nth) {
            char * xt = (char *) params->wdata + t*xq_nb;
            from_float((const float *) ((const char *) x->data + t*x->nb[1]), xt, n_embd);
            if (rk.prepare) {
                rk.prepare(xt, n_embd, xs + t*n_xs);
            }
        }
        ggml_barrier(params->threadpool);
        xq = (const char *) params->wdata;
    }

    // this thread's rows that some token needs; the others are 0
    float * out = (float *) dst->data;
    thread_local std::vector<int32_t> rows;
    rows.clear();
    const int64_t n_chunk = (n_ff + SPARSE_ROW_CHUNK - 1) / SPARSE_ROW_CHUNK;
    for (int64_t c = params->ith; c < n_chunk; c += params->nth) {
        const int64_t i1 = std::min(n_ff, (c + 1)*SPARSE_ROW_CHUNK);
        for (int64_t i = c*SPARSE_ROW_CHUNK; i < i1; ++i) {
            bool any = false;
            for (int64_t t = 0; t < n_tok; ++t) {
                const bool active = sparse_active(mask, i, t);
                any = any || active;
                if (!active) {
                    out[t*n_ff + i] = 0.0f;
                }
            }
            if (any) {
                rows.push_back((int32_t) i);
            }
        }
    }

    // Rows ahead go into L2 (16 whole rows into L1 evicted the rows in use), SPARSE_PREFETCH_BYTES
    // ahead: the kernels prefetch a line of the row ahead with each line they read (a whole row
    // queued at once stalled the reads behind it), vec_dot's rows are prefetched whole after it,
    // except on a long dense run (nearly every row read, rows spanning pages), where the hardware
    // prefetcher follows the one stream. Four rows at a time where all four are read, except with
    // the row kernels on a dense run. Measured (scratch harness, 8 layers of 7B weights from
    // memory, 2 threads, us per gate): the line-by-line prefetch against the whole rows before,
    // Q4_0 850-910 -> 800-870 at s = 0, 900 -> 730-820 at 0.1, 950 -> 660-690 at 0.3, 700 -> 520
    // at 0.5; Q4_K 690-720 -> 450-520 at 0.5. The kernels on a long dense run against vec_dot
    // without prefetch: Q8_0 7B 1830 -> 1460, Q4_0 rows 8192 wide 5990 -> 2340.
    const size_t        row_size  = w->nb[1];
    const int64_t       n_mine    = (n_chunk - params->ith + params->nth - 1)/params->nth*SPARSE_ROW_CHUNK;
    const bool          dense     = (int64_t) rows.size() >= SPARSE_PREFETCH_DENSE*n_mine;
    const bool          long_run  = dense && row_size >= SPARSE_PREFETCH_LONG_ROW;
    const sparse_dot4_t four      = dense && rk.prepare ? nullptr : rk.four;
    const sparse_dot4_t one       = rk.one;
    const size_t        ahead     = std::clamp<size_t>(SPARSE_PREFETCH_BYTES/row_size, 2, 32);
    for (size_t k = 0; k < rows.size(); ) {
        const size_t nr = four && k + 4 <= rows.size() ? 4 : 1;
        // the rows read now and, for each, the row `ahead` that the first kernel to read it
        // prefetches (later calls, other tokens, find it cached and pass the row itself)
        const char * row[4];
        const char * pf[4];
        for (size_t r = 0; r < nr; ++r) {
            row[r] = (const char *) w->data + rows[k + r]*row_size;
            pf[r]  = k + ahead + r < rows.size() ? (const char *) w->data + rows[k + ahead + r]*row_size : row[r];
        }
        for (int64_t t = 0; t < n_tok; ++t) {
            const char * xt = xq + t*xq_nb;
            const void * xk = rk.prepare ? (const void *) (xs + t*n_xs) : xt;
            bool all = nr == 4;
            for (size_t r = 0; r < nr && all; ++r) {
                all = sparse_active(mask, rows[k + r], t);
            }
            if (all) {
                float o[4];
                four(n_embd, row, pf, xk, o);
                for (int r = 0; r < 4; ++r) {
                    out[t*n_ff + rows[k + r]] = o[r];
                    pf[r] = row[r];
                }
                continue;
            }
            for (size_t r = 0; r < nr; ++r) {
                const int64_t i = rows[k + r];
                if (!sparse_active(mask, i, t)) {
                    continue;
                }
                if (one) {
                    one(n_embd, row + r, pf + r, xk, out + t*n_ff + i);
                    pf[r] = row[r];
                } else {
                    traits->vec_dot((int) n_embd, out + t*n_ff + i, 0, row[r], 0, xt, 0, 1);
                }
            }
        }
        for (size_t r = 0; r < nr; ++r) {
            if (pf[r] != row[r] && !long_run) { // read by vec_dot only
                sparse_prefetch_l2(pf[r], row_size);
            }
        }
        k += nr;
    }
}

//
// GGML_OP_SPARSE_MASK
//

static void sparse_mask(const ggml_compute_params * params, ggml_tensor * dst) {
    // one loop serves as kernel and reference: it is the definition
    const ggml_tensor * a     = dst->src[0];
    const float       * scale  = (const float *) dst->src[1]->data;
    const float       * scale2 = dst->src[3] ? (const float *) dst->src[3]->data : nullptr;
    const int           point  = ggml_get_op_params_i32(dst, 0);

    const int64_t n_ff  = a->ne[0];
    const int64_t n_tok = a->ne[1];

    int64_t i0, i1;
    sparse_split(n_ff, params->ith, params->nth, i0, i1);

    for (int64_t t = 0; t < n_tok; ++t) {
        const float * at  = (const float *) ((const char *) a->data + t*a->nb[1]);
        float       * out = (float *) dst->data + t*n_ff;
        const float   thr = sparse_param(dst->src[2], point, t);
        for (int64_t i = i0; i < i1; ++i) {
            out[i] = ggml_sparse_mask_value(at[i], scale, scale2, i, thr);
        }
    }
}

//
// GGML_OP_SPARSE_DOWN
//

static void sparse_down_ref(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * dt = dst->src[0];
    const ggml_tensor * h  = dst->src[1];

    const int64_t n_embd = dt->ne[0];
    const int64_t n_ff   = dt->ne[1];
    const int64_t n_tok  = h->ne[1];

    if (params->ith != 0) {
        return;
    }

    // dense: every row, zeros included; the columns visited tile by tile and pair by pair
    // as the CUDA kernel visits them (ggml-sparse-common.h), which checks that mapping
    const bool float_type = dt->type == GGML_TYPE_F32 || dt->type == GGML_TYPE_F16 || dt->type == GGML_TYPE_BF16;
    const int  qk = float_type ? 1 : (int) ggml_blck_size(dt->type);
    const int  qr = float_type ? 1 : ggml_sparse_down_qr(dt->type);
    std::vector<double> acc(n_embd*n_tok, 0.0);
    float * row = (float *) params->wdata;
    for (int64_t i = 0; i < n_ff; ++i) {
        sparse_row_to_float(dt->type, (const char *) dt->data + i*dt->nb[1], row, n_embd);
        for (int64_t t = 0; t < n_tok; ++t) {
            const double ht = *(const float *) ((const char *) h->data + i*sizeof(float) + t*h->nb[1]);
            for (int64_t c0 = 0; c0 < n_embd; c0 += GGML_SPARSE_DOWN_TILE) {
                for (int pair = 0; pair < GGML_SPARSE_DOWN_TILE/2; ++pair) {
                    int ib, iqs, e0, e1;
                    ggml_sparse_down_pair(pair, qk, qr, ib, iqs, e0, e1);
                    for (int64_t j : { c0 + e0, c0 + e1 }) {
                        if (j < n_embd) {
                            acc[t*n_embd + j] += ht * row[j];
                        }
                    }
                }
            }
        }
    }
    for (int64_t k = 0; k < n_embd*n_tok; ++k) {
        ((float *) dst->data)[k] = (float) acc[k];
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// AVX-512: out[j0, j1) += h_i * down_t_i[j0, j1) over the active rows i. B describes how a row
// stores 32 columns: size (bytes of a stored block), nsub (32-column sub-blocks per stored block:
// 8 for the K-quants' 256), decode (sub-block sub's 32 weights before the scale, and the scale)
// and axpy (add h times the decoded sub-block to 2 registers). The float paths take every
// token's sum in row order with the same operations whether it is decoded alone or in a batch.

struct sparse_blk_val {
    __m512 q0, q1; // the block's quants (or values) as floats
    float  d, m;   // weight = d*q + m
};

struct sparse_blk_q4_0 {
    static constexpr size_t size = sizeof(block_q4_0);
    static constexpr int    nsub = 1;
    static void decode(const void * p, int, sparse_blk_val & v) {
        const block_q4_0 * b = (const block_q4_0 *) p;
        const __m128i q  = _mm_loadu_si128((const __m128i *) b->qs);
        const __m128i m4 = _mm_set1_epi8(0x0F);
        const __m128i e8 = _mm_set1_epi8(8);
        v.q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_sub_epi8(_mm_and_si128(q, m4), e8)));                    // columns 0..15
        v.q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4), e8))); // columns 16..31
        v.d  = GGML_CPU_FP16_TO_FP32(b->d);
    }
    static void axpy(const sparse_blk_val & v, float h, __m512 & a0, __m512 & a1) {
        const __m512 s = _mm512_set1_ps(h * v.d);
        a0 = _mm512_fmadd_ps(s, v.q0, a0);
        a1 = _mm512_fmadd_ps(s, v.q1, a1);
    }
};

struct sparse_blk_q4_1 {
    static constexpr size_t size = sizeof(block_q4_1);
    static constexpr int    nsub = 1;
    static void decode(const void * p, int, sparse_blk_val & v) {
        const block_q4_1 * b  = (const block_q4_1 *) p;
        const ggml_half  * dm = (const ggml_half *) b; // d, then m
        const __m128i q  = _mm_loadu_si128((const __m128i *) b->qs);
        const __m128i m4 = _mm_set1_epi8(0x0F);
        v.q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, m4)));
        v.q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), m4)));
        v.d  = GGML_CPU_FP16_TO_FP32(dm[0]);
        v.m  = GGML_CPU_FP16_TO_FP32(dm[1]);
    }
    static void axpy(const sparse_blk_val & v, float h, __m512 & a0, __m512 & a1) {
        const __m512 s = _mm512_set1_ps(h * v.d);
        const __m512 m = _mm512_set1_ps(h * v.m);
        a0 = _mm512_fmadd_ps(s, v.q0, _mm512_add_ps(a0, m));
        a1 = _mm512_fmadd_ps(s, v.q1, _mm512_add_ps(a1, m));
    }
};

struct sparse_blk_q5_0 {
    static constexpr size_t size = sizeof(block_q5_0);
    static constexpr int    nsub = 1;
    static void decode(const void * p, int, sparse_blk_val & v) {
        const block_q5_0 * b = (const block_q5_0 *) p;
        uint32_t qh; // bit k: weight k's 16
        memcpy(&qh, b->qh, sizeof(qh));
        const __m128i q   = _mm_loadu_si128((const __m128i *) b->qs);
        const __m128i m4  = _mm_set1_epi8(0x0F);
        const __m128i e16 = _mm_set1_epi8(16);
        const __m128i lo  = _mm_and_si128(q, m4);
        const __m128i hi  = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
        v.q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_sub_epi8(_mm_mask_add_epi8(lo, (__mmask16) qh,         lo, e16), e16)));
        v.q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_sub_epi8(_mm_mask_add_epi8(hi, (__mmask16) (qh >> 16), hi, e16), e16)));
        v.d  = GGML_CPU_FP16_TO_FP32(b->d);
    }
    static void axpy(const sparse_blk_val & v, float h, __m512 & a0, __m512 & a1) {
        sparse_blk_q4_0::axpy(v, h, a0, a1);
    }
};

struct sparse_blk_q8_0 {
    static constexpr size_t size = sizeof(block_q8_0);
    static constexpr int    nsub = 1;
    static void decode(const void * p, int, sparse_blk_val & v) {
        const block_q8_0 * b = (const block_q8_0 *) p;
        v.q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) b->qs)));
        v.q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) (b->qs + 16))));
        v.d  = GGML_CPU_FP16_TO_FP32(b->d);
    }
    static void axpy(const sparse_blk_val & v, float h, __m512 & a0, __m512 & a1) {
        sparse_blk_q4_0::axpy(v, h, a0, a1);
    }
};

// float types: the values themselves, d = 1
struct sparse_blk_float {
    static constexpr int nsub = 1;
    static void axpy(const sparse_blk_val & v, float h, __m512 & a0, __m512 & a1) {
        const __m512 s = _mm512_set1_ps(h);
        a0 = _mm512_fmadd_ps(s, v.q0, a0);
        a1 = _mm512_fmadd_ps(s, v.q1, a1);
    }
};

struct sparse_blk_f16 : sparse_blk_float {
    static constexpr size_t size = 32*sizeof(ggml_fp16_t);
    static void decode(const void * p, int, sparse_blk_val & v) {
        v.q0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) p));
        v.q1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) ((const ggml_fp16_t *) p + 16)));
    }
};

struct sparse_blk_bf16 : sparse_blk_float {
    static constexpr size_t size = 32*sizeof(ggml_bf16_t);
    static __m512 load16(const void * p) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *) p)), 16));
    }
    static void decode(const void * p, int, sparse_blk_val & v) {
        v.q0 = load16(p);
        v.q1 = load16((const ggml_bf16_t *) p + 16);
    }
};

struct sparse_blk_f32 : sparse_blk_float {
    static constexpr size_t size = 32*sizeof(float);
    static void decode(const void * p, int, sparse_blk_val & v) {
        v.q0 = _mm512_loadu_ps((const float *) p);
        v.q1 = _mm512_loadu_ps((const float *) p + 16);
    }
};

// K-quants: 256 columns in a stored block, 8 sub-blocks of 32 columns
static void sparse_scale_min_k4(int j, const uint8_t * q, uint8_t & sc, uint8_t & m) {
    if (j < 4) {
        sc = q[j] & 63;
        m  = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        m  = (q[j + 4] >>  4) | ((q[j]     >> 6) << 4);
    }
}

// 32 bytes to 32 floats in two registers
static void sparse_u8_to_ps(__m256i q, sparse_blk_val & v) {
    v.q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(q)));
    v.q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(q, 1)));
}

// sub-block sub's nibbles: the low ones of the 32 bytes at qs + 32*(sub/2) for an even sub, the high ones for an odd
static __m256i sparse_nibbles_k(const uint8_t * qs, int sub) {
    const __m256i q = _mm256_loadu_si256((const __m256i *) (qs + 32*(sub/2)));
    return _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(4*(sub & 1))), _mm256_set1_epi8(0x0F));
}

// Q4_K and Q5_K: d, dmin, then 6-bit scales and mins; weight = d*sc*q - dmin*m
struct sparse_blk_k4 {
    static constexpr int nsub = QK_K/32;
    static void scale(const void * b, const uint8_t * scales, int sub, sparse_blk_val & v) {
        const ggml_half * dm = (const ggml_half *) b;
        uint8_t sc, m;
        sparse_scale_min_k4(sub, scales, sc, m);
        v.d = GGML_CPU_FP16_TO_FP32(dm[0]) * sc;
        v.m = -GGML_CPU_FP16_TO_FP32(dm[1]) * m;
    }
    static void axpy(const sparse_blk_val & v, float h, __m512 & a0, __m512 & a1) {
        sparse_blk_q4_1::axpy(v, h, a0, a1);
    }
};

struct sparse_blk_q4_K : sparse_blk_k4 {
    static constexpr size_t size = sizeof(block_q4_K);
    static void decode(const void * p, int sub, sparse_blk_val & v) {
        const block_q4_K * b = (const block_q4_K *) p;
        sparse_u8_to_ps(sparse_nibbles_k(b->qs, sub), v);
        scale(b, b->scales, sub, v);
    }
};

struct sparse_blk_q5_K : sparse_blk_k4 {
    static constexpr size_t size = sizeof(block_q5_K);
    static void decode(const void * p, int sub, sparse_blk_val & v) {
        const block_q5_K * b = (const block_q5_K *) p;
        // the fifth bit: bit sub of each of the 32 qh bytes
        const __m256i qh = _mm256_loadu_si256((const __m256i *) b->qh);
        const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(sub)), _mm256_set1_epi8(1));
        sparse_u8_to_ps(_mm256_or_si256(sparse_nibbles_k(b->qs, sub), _mm256_slli_epi16(hi, 4)), v);
        scale(b, b->scales, sub, v);
    }
};

// Q6_K: 16-column scales, folded into the quants (|q*scale| <= 4096: exact as floats)
struct sparse_blk_q6_K {
    static constexpr size_t size = sizeof(block_q6_K);
    static constexpr int    nsub = QK_K/32;
    static void decode(const void * p, int sub, sparse_blk_val & v) {
        const block_q6_K * b = (const block_q6_K *) p;
        const int half = sub/4; // 128 columns: 64 ql bytes, 32 qh bytes, 8 scales
        const int k    = sub%4;
        const __m256i ql = _mm256_loadu_si256((const __m256i *) (b->ql + 64*half + 32*(k & 1)));
        const __m256i qh = _mm256_loadu_si256((const __m256i *) (b->qh + 32*half));
        const __m256i lo = _mm256_and_si256(_mm256_srl_epi16(ql, _mm_cvtsi32_si128(4*(k >> 1))), _mm256_set1_epi8(0x0F));
        const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2*k)), _mm256_set1_epi8(3));
        const __m256i q  = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
        const int8_t * sc = b->scales + 8*half + 2*k;
        v.q0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))),      _mm512_set1_ps(sc[0]));
        v.q1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), _mm512_set1_ps(sc[1]));
        v.d  = GGML_CPU_FP16_TO_FP32(b->d);
    }
    static void axpy(const sparse_blk_val & v, float h, __m512 & a0, __m512 & a1) {
        sparse_blk_q4_0::axpy(v, h, a0, a1);
    }
};

// 32-column block c of a row
template <typename B>
static void sparse_blk_decode(const char * row, int64_t c, sparse_blk_val & v) {
    B::decode(row + c/B::nsub*B::size, (int) (c % B::nsub), v);
}

// out[0, 32) += h times a decoded block
template <typename B>
static void sparse_blk_axpy_out(const sparse_blk_val & v, float h, float * out) {
    __m512 a0 = _mm512_loadu_ps(out);
    __m512 a1 = _mm512_loadu_ps(out + 16);
    B::axpy(v, h, a0, a1);
    _mm512_storeu_ps(out,      a0);
    _mm512_storeu_ps(out + 16, a1);
}

// One token: the active rows stream through one after the other, each read contiguously over a
// span of SPARSE_DOWN_SPAN blocks whose sums stay in L1 (out), the row SPARSE_PREFETCH ahead
// prefetched into L2 8 blocks at a time as these are read (5-25 % less time than its whole
// span at once: 8 layers of 7B weights, 2 threads, Q5_0, Q5_K, Q6_K, F16). (Sums held in registers
// over 8 blocks of every row in turn were faster only where decoding dominates, Q4_K, and by
// less than they lost on the others: reading a row in short pieces, far apart in time, wastes
// memory bandwidth.)
template <typename B>
static void sparse_down_rows(const char * data, size_t nb1, const std::vector<std::pair<int32_t, float>> & act,
        int64_t j0, int64_t j1, float * out) {
    for (int64_t cs = j0/32; cs < j1/32; cs += SPARSE_DOWN_SPAN) {
        const int64_t ce = std::min(j1/32, cs + SPARSE_DOWN_SPAN);
        for (size_t r = 0; r < act.size(); ++r) {
            const char * row = data + act[r].first*nb1;
            const float  h   = act[r].second;
            const char * pf  = r + SPARSE_PREFETCH < act.size() ? data + act[r + SPARSE_PREFETCH].first*nb1 : row;
            int64_t c = cs;
            for (; c + 8 <= ce; c += 8) {
                const size_t off = c/B::nsub*B::size; // c is a whole number of stored blocks
                const char * blk = row + off;
                sparse_prefetch_l2(pf + off, (8 + B::nsub - 1)/B::nsub*B::size);
#pragma GCC unroll 8
                for (int b = 0; b < 8; ++b) {
                    sparse_blk_val v;
                    B::decode(blk + b/B::nsub*B::size, b % B::nsub, v);
                    sparse_blk_axpy_out<B>(v, h, out + (c + b)*32);
                }
            }
            for (; c < ce; ++c) {
                sparse_blk_val v;
                sparse_blk_decode<B>(row, c, v);
                sparse_blk_axpy_out<B>(v, h, out + c*32);
            }
        }
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
// Integer sums (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K). Counted from the source, the float path takes about
// 19 instructions for each 32 weights of a row (decode to floats, then load, multiply-add and
// store the sums), this one about 4 (Q4_0: 11 for a quad of rows, 11 to flush a group of 16,
// about 8 per row for the coefficients of 16 blocks). It takes SPARSE_DOWN_GROUP active rows
// at a time. Per 32-column block (a K-quant's sub-block), each row's coefficient h*d becomes
// a signed byte on a scale shared by the group (its largest is 127); vpdpbusd multiplies the
// quants of four rows, each 32-bit lane a column's four bytes, by the four coefficients and
// adds them to 32-bit integers; the scaled sum goes into the float sums once per group.
// Rounding a coefficient moves it by at most 1/254 of the group's largest: the step ggml's
// mat-vec applies to its activations, each to 1/254 of its 32-block's largest. A block whose
// coefficients are not all finite takes the float path.
//
// Q describes a type: blk (its float path), scales (d of 16 blocks from c, 0 past n, and m if
// has_min, the weight being d*q + m: a row's coefficients are h*d, its min terms h*m), q_off
// (subtracted from the quants) and quants (four rows' quants of the `step` blocks from c as
// unsigned bytes, byte 4i + u of a lane of column i from row u: q[2u] columns 0..15 of block
// c + u, q[2u + 1] 16..31).
static constexpr int SPARSE_DOWN_GROUP = 16;
// ... and in a prompt batch (more than GGML_SPARSE_MAX_SMALL_BATCH tokens), which then flushes
// a group into the float sums half as often (docs/ARCHITECTURE.md: 128 tokens at the 7B shape,
// Q4_0 89-103 -> 55-68 ms); one token is no faster with it.
static constexpr int SPARSE_DOWN_GROUP_BATCH = 32;

// vpermb/vpermt2b indices: byte 4i + u of the result is byte BASE + i + u*STRIDE of the
// source, column i of row u when the rows' bytes are STRIDE apart
template <int STRIDE, int BASE>
static __m512i sparse_quad_idx() {
    static constexpr struct idx_t {
        alignas(64) uint8_t v[64];
        constexpr idx_t() : v() { for (int l = 0; l < 64; ++l) { v[l] = (uint8_t) (BASE + l/4 + (l % 4)*STRIDE); } }
    } idx;
    return _mm512_load_si512(idx.v);
}

// Q4_0 and Q4_1 (block: their block type): each row's 16 bytes of nibbles, low ones first
template <typename block>
struct sparse_int_nibbles {
    static void quants(const char * const * r, int64_t c, __m512i * q) {
        const __m512i idx = sparse_quad_idx<16, 0>();
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *) ((const block *) r[0])[c].qs));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *) ((const block *) r[1])[c].qs), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *) ((const block *) r[2])[c].qs), 2);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *) ((const block *) r[3])[c].qs), 3);
        const __m512i p  = _mm512_permutexvar_epi8(idx, v);
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        q[0] = _mm512_and_si512(p, m4);
        q[1] = _mm512_and_si512(_mm512_srli_epi16(p, 4), m4);
    }
};

// two rows' 32 bytes from offset off, r0's then r1's
static __m512i sparse_rows_32(const char * r0, const char * r1, size_t off) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *) (r0 + off))),
                              _mm256_loadu_si256((const __m256i *) (r1 + off)), 1);
}

// The NH 16-bit halves at the start of each of n <= 16 blocks of SIZE bytes from p: half h of
// block b in word 16h + b (the words of blocks n.. zero). Read as 128-byte windows of whole
// blocks, one word permute each (with a gather per row, the axpy took 10 % longer, 1 thread;
// on the CPU GDS does not affect that this project measures on, 4-8 % shorter for Q8_0 and Q5_0,
// but the GDS microcode mitigation on Ice Lake and Tiger Lake, CPUs with VNNI, targets gathers:
// not measured here).
template <int SIZE, int NH>
struct sparse_heads_idx {
    static constexpr int per = (128 - 2*NH)/SIZE + 1; // blocks whose heads are in one window
    static constexpr int n_w = (16 + per - 1)/per;
    alignas(64) uint16_t v[n_w][32];
    constexpr sparse_heads_idx() : v() {
        for (int w = 0; w < n_w; ++w) {
            for (int l = 0; l < 32; ++l) {
                const int b = l % 16;
                v[w][l] = (uint16_t) ((l/16 < NH && b/per == w) ? (b*SIZE - w*per*SIZE)/2 + l/16 : 0);
            }
        }
    }
};

static __mmask64 sparse_byte_mask(int64_t n) {
    return n >= 64 ? ~(__mmask64) 0 : n <= 0 ? 0 : ((__mmask64) 1 << n) - 1;
}

template <int SIZE, int NH>
static __m512i sparse_block_heads(const char * p, int n) {
    using I = sparse_heads_idx<SIZE, NH>;
    static constexpr I idx;
    const int64_t bytes = (int64_t) n*SIZE;
    __m512i r = _mm512_setzero_si512();
    for (int w = 0; w < I::n_w && w*I::per < n; ++w) {
        const int64_t s  = (int64_t) w*I::per*SIZE;
        const __m512i lo = _mm512_maskz_loadu_epi8(sparse_byte_mask(bytes - s),      p + s);
        const __m512i hi = _mm512_maskz_loadu_epi8(sparse_byte_mask(bytes - s - 64), p + s + 64);
        const __m512i v  = _mm512_permutex2var_epi16(lo, _mm512_load_si512(idx.v[w]), hi);
        const uint32_t blocks = ((1u << std::min(16, (w + 1)*I::per)) - 1) & ~((1u << (w*I::per)) - 1);
        r = _mm512_mask_mov_epi16(r, NH == 2 ? blocks | blocks << 16 : blocks, v);
    }
    return r;
}

// Q4_0, Q5_0 and Q8_0: one block at a time, no min, d a block's first half
template <typename BLK, int Q_OFF>
struct sparse_int_d {
    using blk = BLK;
    static constexpr int  q_off   = Q_OFF;
    static constexpr bool has_min = false;
    static constexpr int  step    = 1;
    static void scales(const char * row, int64_t c, int n, __m512 & d, __m512 &) {
        d = _mm512_cvtph_ps(_mm512_castsi512_si256(sparse_block_heads<blk::size, 1>(row + c*blk::size, n)));
    }
};

struct sparse_int_q4_0 : sparse_int_d<sparse_blk_q4_0, 8>, sparse_int_nibbles<block_q4_0> {};

struct sparse_int_q4_1 : sparse_int_nibbles<block_q4_1> {
    using blk = sparse_blk_q4_1;
    static constexpr int  q_off   = 0;
    static constexpr bool has_min = true;
    static constexpr int  step    = 1;
    static void scales(const char * row, int64_t c, int n, __m512 & d, __m512 & m) {
        const __m512i dm = sparse_block_heads<blk::size, 2>(row + c*blk::size, n); // d, then m
        d = _mm512_cvtph_ps(_mm512_castsi512_si256(dm));
        m = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(dm, 1));
    }
};

// Q5_0: Q4_0's nibbles, plus each column's fifth bit from qh (bit i: column i), 16 added
struct sparse_int_q5_0 : sparse_int_d<sparse_blk_q5_0, 16> {
    // from four rows' qh words (row u's in bytes 4u..4u + 3): byte 4i + u of the result is the
    // byte holding bit BASE*8 + i of row u's word, and qh_bits() masks that bit (i%8)
    template <int BASE>
    static __m512i qh_idx() {
        static constexpr struct idx_t {
            alignas(64) uint8_t v[64];
            constexpr idx_t() : v() { for (int l = 0; l < 64; ++l) { v[l] = (uint8_t) (4*(l % 4) + BASE + l/32); } }
        } idx;
        return _mm512_load_si512(idx.v);
    }
    static __m512i qh_bits() {
        static constexpr struct bits_t {
            alignas(64) uint8_t v[64];
            constexpr bits_t() : v() { for (int l = 0; l < 64; ++l) { v[l] = (uint8_t) (1u << (l/4 % 8)); } }
        } bits;
        return _mm512_load_si512(bits.v);
    }
    static void quants(const char * const * r, int64_t c, __m512i * q) {
        sparse_int_nibbles<block_q5_0>::quants(r, c, q);
        uint32_t qh[4];
        for (int u = 0; u < 4; ++u) {
            memcpy(&qh[u], ((const block_q5_0 *) r[u])[c].qh, sizeof(qh[u]));
        }
        const __m512i h   = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *) qh));
        const __m512i b   = qh_bits();
        const __m512i e16 = _mm512_set1_epi8(16);
        const __mmask64 h0 = _mm512_test_epi8_mask(_mm512_permutexvar_epi8(qh_idx<0>(), h), b); // columns 0..15
        const __mmask64 h1 = _mm512_test_epi8_mask(_mm512_permutexvar_epi8(qh_idx<2>(), h), b); // 16..31
        q[0] = _mm512_mask_add_epi8(q[0], h0, q[0], e16);
        q[1] = _mm512_mask_add_epi8(q[1], h1, q[1], e16);
    }
};

struct sparse_int_q8_0 : sparse_int_d<sparse_blk_q8_0, 128> {
    // the quants plus 128 (q_off), to be unsigned
    static void quants(const char * const * r, int64_t c, __m512i * q) {
        const __m512i lo = sparse_quad_idx<32, 0>();
        const __m512i hi = sparse_quad_idx<32, 16>();
        const size_t  off = c*sizeof(block_q8_0) + offsetof(block_q8_0, qs);
        const __m512i a   = sparse_rows_32(r[0], r[1], off);
        const __m512i b   = sparse_rows_32(r[2], r[3], off);
        const __m512i m   = _mm512_set1_epi8((char) 0x80);
        q[0] = _mm512_xor_si512(_mm512_permutex2var_epi8(a, lo, b), m);
        q[1] = _mm512_xor_si512(_mm512_permutex2var_epi8(a, hi, b), m);
    }
};

// Q4_K: a block is a 32-column sub-block (c/8 the super-block, c%8 the sub-block);
// weight = d*sc*q - dmin*m, the 6-bit sc and m decoded per row
struct sparse_int_q4_K {
    using blk = sparse_blk_q4_K;
    static constexpr int  q_off   = 0;
    static constexpr bool has_min = true;
    static constexpr int  step    = 2;
    static void scales(const char * row, int64_t c, int n, __m512 & d, __m512 & m) {
        // the two super-blocks (n: whole ones, columns split in 256s) side by side in 256 bits, in
        // registers: through memory, the loads after the stores stalled (perf: 10 % of the axpy)
        const block_q4_K * b = (const block_q4_K *) row + c/8;
        const bool two = n > 8;
        __m256i u = _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *) b[0].scales));
        uint32_t dd1 = 0; // d and dmin of the second super-block, 0 if there is none
        if (two) {
            u = _mm256_inserti128_si256(u, _mm_loadu_si128((const __m128i *) b[1].scales), 1);
            memcpy(&dd1, &b[1], sizeof(dd1));
        }
        uint32_t dd0;
        memcpy(&dd0, &b[0], sizeof(dd0));
        // per 128-bit lane as sparse_scales_mins_k4: bytes 0..7 the scales, 8..15 the mins
        const __m256i lo = _mm256_and_si256(u, _mm256_set1_epi8(0x3F));
        const __m256i u2 = _mm256_srlv_epi32(_mm256_shuffle_epi32(u, _MM_SHUFFLE(2, 2, 2, 2)), _mm256_setr_epi32(0, 4, 0, 0, 0, 4, 0, 0));
        const __m256i hi = _mm256_or_si256(_mm256_and_si256(u2, _mm256_set1_epi8(0x0F)),
                                           _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 6), _mm256_set1_epi8(0x03)), 4));
        // qwords: both scales, then both mins
        const __m256i sm = _mm256_permute4x64_epi64(_mm256_unpacklo_epi32(lo, hi), _MM_SHUFFLE(3, 1, 2, 0));
        // d0, dmin0, d1, dmin1 as floats, each over its super-block's 8 lanes
        const __m512 f  = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_setr_epi32((int) dd0, (int) dd1, 0, 0)));
        const __m512 vd = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2), f);
        const __m512 vm = _mm512_permutexvar_ps(_mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3), f);
        const __m512 nm = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(vm), _mm512_set1_epi32(INT32_MIN))); // -dmin
        d = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(sm))));
        m = _mm512_mul_ps(nm, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(sm, 1))));
    }
    // sub-blocks c and c + 1 (c even): the low and the high nibbles of the 32 bytes at qs + 16*(c%8)
    static void quants(const char * const * r, int64_t c, __m512i * q) {
        const __m512i lo = sparse_quad_idx<32, 0>();
        const __m512i hi = sparse_quad_idx<32, 16>();
        const size_t  off = c/8*sizeof(block_q4_K) + offsetof(block_q4_K, qs) + 16*(c % 8);
        const __m512i a   = sparse_rows_32(r[0], r[1], off);
        const __m512i b   = sparse_rows_32(r[2], r[3], off);
        const __m512i p0  = _mm512_permutex2var_epi8(a, lo, b); // columns 0..15 of the four rows
        const __m512i p1  = _mm512_permutex2var_epi8(a, hi, b); // 16..31
        const __m512i m4  = _mm512_set1_epi8(0x0F);
        q[0] = _mm512_and_si512(p0, m4);
        q[1] = _mm512_and_si512(p1, m4);
        q[2] = _mm512_and_si512(_mm512_srli_epi16(p0, 4), m4);
        q[3] = _mm512_and_si512(_mm512_srli_epi16(p1, 4), m4);
    }
};

// four rows' coefficients of 16 blocks (q[u]: row u's, each within -127..127) as 16 words, byte u
// of word b row u's of block b. The packs interleave the rows per 128-bit lane (bytes 16l + 4u +
// j: row u's of block 4l + j); one byte permute puts each block's four together
static __m512i sparse_pack_quad(const __m512i * q) {
    static constexpr struct idx_t {
        alignas(64) uint8_t v[64];
        constexpr idx_t() : v() { for (int l = 0; l < 64; ++l) { v[l] = (uint8_t) (16*(l/16) + 4*(l % 4) + l/4 % 4); } }
    } idx;
    const __m512i p = _mm512_packs_epi16(_mm512_packs_epi32(q[0], q[1]), _mm512_packs_epi32(q[2], q[3]));
    return _mm512_permutexvar_epi8(_mm512_load_si512(idx.v), p);
}

// tokens at most that share a group's quants (sparse_down_rows_int)
static constexpr int SPARSE_DOWN_SHARE = 4;

// A batch's block scales of one slab, decoded once (Q::scales of row i0 + r, 16 blocks from
// c0 + 16 k, at d[r*n_chunks + k], the mins at m) instead of once per group of tokens that
// share the rows: perf, 128 tokens at the 7B shape, Q8_0: decoding them took 30 % of the
// axpy's time
struct sparse_v16 {
    __m512 v;
};

struct sparse_int_tab {
    const sparse_v16 * d;
    const sparse_v16 * m;
    int64_t            i0;
    int64_t            n_chunks;
};

// the n active rows (in row order) of NT <= SPARSE_DOWN_SHARE tokens that have the same ones,
// G at a time,
// acts[t] token t's (row, h), into outs[t][j0, j1): each token summed exactly as alone, each
// row's scales read and each row quad's quants unpacked once for all of them
template <typename Q, int NT, int G>
static void sparse_down_rows_int(const char * data, size_t nb1, const std::pair<int32_t, float> * const * acts,
        size_t n, int64_t j0, int64_t j1, float * const * outs, const sparse_int_tab * tab) {
    using B = typename Q::blk;
    constexpr int NQ = 2*Q::step;
    const std::pair<int32_t, float> * act = acts[0];
    const int64_t c0 = j0/32;
    const int64_t c1 = j1/32;
    for (size_t g = 0; g < n; g += G) {
        const int nr = (int) std::min<size_t>(G, n - g);
        const char * rows[G];
        float        h[NT][G];
        for (int k = 0; k < G; ++k) {
            rows[k] = data + act[g + (k < nr ? k : 0)].first*nb1;
            for (int t = 0; t < NT; ++t) {
                h[t][k] = k < nr ? acts[t][g + k].second : 0.0f; // a padding row adds 0
            }
        }
        for (int64_t cb = c0; cb < c1; cb += 16) {
            const int nb = (int) std::min<int64_t>(16, c1 - cb);
            if (!tab) {
                // a token or a few: these blocks of the next group's rows prefetched into L2
                // (from memory, AMD EPYC, 70B every row: Q4_K 11.6 -> 6.3 ms; docs/ARCHITECTURE.md)
                const size_t len = (nb + B::nsub - 1)/B::nsub*B::size;
                for (size_t k = g + G; k < std::min(n, g + 2*G); ++k) {
                    sparse_prefetch_l2(data + act[k].first*nb1 + cb/B::nsub*B::size, len);
                }
            }
            // each row's scales of the 16 blocks; per token, the coefficients row by row as bytes on
            // the group's scale (its largest 127), the four of a quad of rows in one 32-bit word,
            // and the min terms
            __m512         dm[2][G];
            const __m512 * d[G];
            const __m512 * m[G];
            for (int k = 0; k < G; ++k) {
                if (tab) {
                    const int64_t e = (act[g + (k < nr ? k : 0)].first - tab->i0)*tab->n_chunks + (cb - c0)/16;
                    d[k] = &tab->d[e].v;
                    m[k] = Q::has_min ? &tab->m[e].v : nullptr;
                } else {
                    Q::scales(rows[k], cb, nb, dm[0][k], dm[1][k]);
                    d[k] = &dm[0][k];
                    m[k] = &dm[1][k];
                }
            }
            alignas(64) int32_t quad[NT][G/4][16];
            alignas(64) int32_t init[NT][16];
            alignas(64) float   scale[NT][16];
            alignas(64) float   add[NT][16];
            __mmask16           fin[NT];
            for (int t = 0; t < NT; ++t) {
                __m512 cf[G];
                __m512 a0 = _mm512_setzero_ps(); // four chains of the largest: max is exact in any order
                __m512 a1 = a0;
                __m512 a2 = a0;
                __m512 a3 = a0;
                __m512 mins = a0;
                for (int k = 0; k < G; k += 4) {
                    for (int i = 0; i < 4; ++i) {
                        const __m512 hk = _mm512_set1_ps(h[t][k + i]);
                        cf[k + i] = _mm512_mul_ps(hk, *d[k + i]);
                        if constexpr (Q::has_min) {
                            mins = _mm512_fmadd_ps(hk, *m[k + i], mins);
                        }
                    }
                    a0 = _mm512_max_ps(a0, _mm512_abs_ps(cf[k]));
                    a1 = _mm512_max_ps(a1, _mm512_abs_ps(cf[k + 1]));
                    a2 = _mm512_max_ps(a2, _mm512_abs_ps(cf[k + 2]));
                    a3 = _mm512_max_ps(a3, _mm512_abs_ps(cf[k + 3]));
                }
                const __m512 amax = _mm512_max_ps(_mm512_max_ps(a0, a1), _mm512_max_ps(a2, a3));
                fin[t] = _mm512_cmp_ps_mask(amax, _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
                const __mmask16 pos = _mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ) & fin[t];
                const __m512    inv = _mm512_maskz_div_ps(pos, _mm512_set1_ps(127.0f), amax);
                __m512i sum = _mm512_setzero_si512();
                for (int k = 0; k < G; k += 4) {
                    __m512i q[4];
                    for (int i = 0; i < 4; ++i) {
                        q[i] = _mm512_cvtps_epi32(_mm512_mul_ps(cf[k + i], inv)); // within +-127: packs exactly
                    }
                    const __m512i w = sparse_pack_quad(q);
                    sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi8(1), w);
                    _mm512_store_si512(quad[t][k/4], w);
                }
                _mm512_store_si512(init[t], _mm512_mullo_epi32(sum, _mm512_set1_epi32(-Q::q_off)));
                _mm512_store_ps(scale[t], _mm512_mul_ps(amax, _mm512_set1_ps(1.0f/127.0f)));
                _mm512_store_ps(add[t], mins);
            }
            constexpr unsigned all = (1u << Q::step) - 1;
            for (int j = 0; j < nb; j += Q::step) {
                const int64_t c = cb + j;
                bool    ok[NT];
                __m512i a[NT][NQ];
                for (int t = 0; t < NT; ++t) {
                    ok[t] = ((fin[t] >> j) & all) == all;
                    for (int i = 0; i < NQ; ++i) {
                        a[t][i] = _mm512_set1_epi32(init[t][j + i/2]);
                    }
                }
                for (int k = 0; k < nr; k += 4) {
                    __m512i q[NQ];
                    Q::quants(rows + k, c, q);
                    for (int t = 0; t < NT; ++t) {
                        for (int i = 0; i < NQ; ++i) {
                            a[t][i] = _mm512_dpbusd_epi32(a[t][i], q[i], _mm512_set1_epi32(quad[t][k/4][j + i/2]));
                        }
                    }
                }
                for (int t = 0; t < NT; ++t) {
                    float * o = outs[t] + c*32;
                    if (!ok[t]) {
                        for (int u = 0; u < Q::step; ++u) {
                            for (int k = 0; k < nr; ++k) {
                                sparse_blk_val v;
                                sparse_blk_decode<B>(rows[k], c + u, v);
                                sparse_blk_axpy_out<B>(v, h[t][k], o + 32*u);
                            }
                        }
                        continue;
                    }
                    for (int u = 0; u < Q::step; ++u) {
                        const __m512 sc = _mm512_set1_ps(scale[t][j + u]);
                        const __m512 m  = _mm512_set1_ps(add[t][j + u]);
                        float * ou = o + 32*u;
                        __m512 s0 = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(a[t][2*u]),     _mm512_loadu_ps(ou));
                        __m512 s1 = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(a[t][2*u + 1]), _mm512_loadu_ps(ou + 16));
                        if constexpr (Q::has_min) {
                            s0 = _mm512_add_ps(s0, m);
                            s1 = _mm512_add_ps(s1, m);
                        }
                        _mm512_storeu_ps(ou,      s0);
                        _mm512_storeu_ps(ou + 16, s1);
                    }
                }
            }
        }
    }
}

// sparse_down_rows_int for nt tokens
template <typename Q, int G>
static void sparse_down_rows_int(const char * data, size_t nb1, const std::pair<int32_t, float> * const * acts, int nt,
        size_t n, int64_t j0, int64_t j1, float * const * outs, const sparse_int_tab * tab) {
    static_assert(SPARSE_DOWN_SHARE == 4, "one instance per token count");
    switch (nt) {
        case 1:  sparse_down_rows_int<Q, 1, G>(data, nb1, acts, n, j0, j1, outs, tab); break;
        case 2:  sparse_down_rows_int<Q, 2, G>(data, nb1, acts, n, j0, j1, outs, tab); break;
        case 3:  sparse_down_rows_int<Q, 3, G>(data, nb1, acts, n, j0, j1, outs, tab); break;
        default: sparse_down_rows_int<Q, 4, G>(data, nb1, acts, n, j0, j1, outs, tab); break;
    }
}

// Groups never span two slabs of SPARSE_DOWN_SLAB rows, so a token gets the same sums alone
// (act: its active rows) and in a batch, where each slab's rows stay in L2 while every token
// goes over its own active rows in them. (A row whose h is far larger than the rest of its
// group, a massive activation, leaves the others coarse steps: 1/254 of it, as ggml's mat-vec
// rounds every activation of its 32-block to 1/254 of the block's largest.)

static constexpr int SPARSE_SLAB_WORDS = SPARSE_DOWN_SLAB/16;

// A token's active rows in [i0, i1) (at most a slab) and their h, in row order, into a (room for
// 16 more: whole vectors are stored), and bit i%16 of bits[i/16] set where row i0 + i is active
// (all SPARSE_SLAB_WORDS written); returns how many. Tokens with the same rows have the same
// bits. perf, Gemma-3 mode off, pp128: built a row at a time and compared as lists, the rows
// (with the scale table) took 3.6 % of the time, the axpy 10.5 %
static size_t sparse_slab_rows(const float * ht, int64_t i0, int64_t i1, std::pair<int32_t, float> * a, uint16_t * bits) {
    static_assert(sizeof(std::pair<int32_t, float>) == 8, "a (row, h) pair is one 64-bit lane, the row first");
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i lo   = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23); // (row, h) of 0..7
    const __m512i hi   = _mm512_add_epi32(lo, _mm512_set1_epi32(8));                               // of 8..15
    size_t k = 0;
    for (int w = 0; w < SPARSE_SLAB_WORDS; ++w) {
        const int64_t   i  = i0 + 16*w;
        const __mmask16 in = i1 - i >= 16 ? 0xFFFF : i1 <= i ? 0 : (__mmask16) ((1u << (i1 - i)) - 1);
        const __m512    v  = _mm512_maskz_loadu_ps(in, ht + i);
        const __mmask16 nz = _mm512_mask_cmp_ps_mask(in, v, _mm512_setzero_ps(), _CMP_NEQ_UQ); // NaN: active, as h != 0
        const __m512i   r  = _mm512_add_epi32(_mm512_set1_epi32((int32_t) i), iota);
        _mm512_storeu_si512(a + k, _mm512_maskz_compress_epi64((__mmask8) nz, _mm512_permutex2var_epi32(r, lo, _mm512_castps_si512(v))));
        k += __builtin_popcount(nz & 0xFF);
        _mm512_storeu_si512(a + k, _mm512_maskz_compress_epi64((__mmask8) (nz >> 8), _mm512_permutex2var_epi32(r, hi, _mm512_castps_si512(v))));
        k += __builtin_popcount(nz >> 8);
        bits[w] = nz;
    }
    return k;
}

template <typename Q>
static void sparse_down_int(const char * data, size_t nb1, const ggml_tensor * h,
        const std::vector<std::pair<int32_t, float>> & act, int64_t r0, int64_t r1, int64_t j0, int64_t j1, float * out, int64_t n_embd) {
    if (h->ne[1] == 1) {
        for (size_t a = 0; a < act.size(); ) {
            const int64_t end = (act[a].first/SPARSE_DOWN_SLAB + 1)*SPARSE_DOWN_SLAB;
            size_t b = a;
            while (b < act.size() && act[b].first < end) {
                ++b;
            }
            const std::pair<int32_t, float> * acts[1] = { act.data() + a };
            float * const                     outs[1] = { out };
            sparse_down_rows_int<Q, SPARSE_DOWN_GROUP>(data, nb1, acts, 1, b - a, j0, j1, outs, nullptr);
            a = b;
        }
        return;
    }
    // each token's active rows of the slab; tokens with the same ones (mode off, dense prompts:
    // all of them) go up to SPARSE_DOWN_SHARE at a time
    thread_local std::vector<std::vector<std::pair<int32_t, float>>> slab;
    thread_local std::vector<size_t> n_act;
    thread_local std::vector<uint16_t> bits; // each token's SPARSE_SLAB_WORDS
    thread_local std::vector<sparse_v16> tab_d;
    thread_local std::vector<sparse_v16> tab_m;
    const int64_t n_tok    = h->ne[1];
    const bool    batch    = n_tok > GGML_SPARSE_MAX_SMALL_BATCH;
    const int64_t n_chunks = (j1/32 - j0/32 + 15)/16;
    slab.resize(n_tok);
    n_act.resize(n_tok);
    bits.resize(n_tok*SPARSE_SLAB_WORDS);
    for (int64_t i0 = r0; i0 < r1; i0 += SPARSE_DOWN_SLAB) {
        const int64_t i1 = std::min(r1, i0 + SPARSE_DOWN_SLAB);
        uint16_t used[SPARSE_SLAB_WORDS] = {}; // the rows some token needs
        for (int64_t t = 0; t < n_tok; ++t) {
            slab[t].resize(SPARSE_DOWN_SLAB + 16);
            uint16_t * b = bits.data() + t*SPARSE_SLAB_WORDS;
            n_act[t] = sparse_slab_rows((const float *) ((const char *) h->data + t*h->nb[1]), i0, i1, slab[t].data(), b);
            for (int w = 0; w < SPARSE_SLAB_WORDS; ++w) {
                used[w] |= b[w];
            }
        }
        if (batch) {
            tab_d.resize((i1 - i0)*n_chunks);
            tab_m.resize(Q::has_min ? tab_d.size() : 0);
            for (int64_t i = i0; i < i1; ++i) {
                for (int64_t k = 0; k < n_chunks && (used[(i - i0)/16] >> (i - i0)%16 & 1); ++k) {
                    const int64_t cb = j0/32 + 16*k;
                    const int64_t e  = (i - i0)*n_chunks + k;
                    __m512 m;
                    Q::scales(data + i*nb1, cb, (int) std::min<int64_t>(16, j1/32 - cb), tab_d[e].v, m);
                    if constexpr (Q::has_min) {
                        tab_m[e].v = m;
                    }
                }
            }
        }
        const sparse_int_tab tab = { tab_d.data(), tab_m.data(), i0, n_chunks };
        const auto same_rows = [](int64_t a, int64_t b) {
            return memcmp(&bits[a*SPARSE_SLAB_WORDS], &bits[b*SPARSE_SLAB_WORDS], sizeof(uint16_t)*SPARSE_SLAB_WORDS) == 0;
        };
        for (int64_t t = 0; t < n_tok; ) {
            const std::pair<int32_t, float> * acts[SPARSE_DOWN_SHARE];
            float *                           outs[SPARSE_DOWN_SHARE];
            int nt = 0;
            for (; nt < SPARSE_DOWN_SHARE && t + nt < n_tok && same_rows(t, t + nt); ++nt) {
                acts[nt] = slab[t + nt].data();
                outs[nt] = out + (t + nt)*n_embd;
            }
            if (batch) {
                sparse_down_rows_int<Q, SPARSE_DOWN_GROUP_BATCH>(data, nb1, acts, nt, n_act[t], j0, j1, outs, &tab);
            } else {
                sparse_down_rows_int<Q, SPARSE_DOWN_GROUP>(data, nb1, acts, nt, n_act[t], j0, j1, outs, nullptr);
            }
            t += nt;
        }
    }
}
#else
// no integer path: sparse_down_block is only ever given I = void
template <typename Q>
static void sparse_down_int(const char *, size_t, const ggml_tensor *, const std::vector<std::pair<int32_t, float>> &, int64_t, int64_t, int64_t, int64_t, float *, int64_t);
using sparse_int_q4_0 = void;
using sparse_int_q4_1 = void;
using sparse_int_q5_0 = void;
using sparse_int_q8_0 = void;
using sparse_int_q4_K = void;
#endif

// Several tokens: NT tokens x NB blocks (2*NB*NT registers), continuing from the partial sums
// in out, over the rows [i0, i1) that one of the tokens uses. A block is decoded once and added
// to every token of the group; a token whose h is 0 adds exactly 0, so its sum is the one it
// gets alone (the weights being finite).
template <typename B, int NB, int NT>
static void sparse_down_group(const char * data, size_t nb1, const float * h, size_t h_nb1,
        int64_t i0, int64_t i1, int64_t c, float * out, int64_t n_embd) {
    __m512 acc[NT][2*NB];
    for (int t = 0; t < NT; ++t) {
        for (int k = 0; k < 2*NB; ++k) {
            acc[t][k] = _mm512_loadu_ps(out + t*n_embd + c*32 + 16*k);
        }
    }
    for (int64_t i = i0; i < i1; ++i) {
        float ht[NT];
        bool  any = false;
        for (int t = 0; t < NT; ++t) {
            ht[t] = *(const float *) ((const char *) h + t*h_nb1 + i*sizeof(float));
            any   = any || ht[t] != 0.0f;
        }
        if (!any) {
            continue;
        }
        for (int b = 0; b < NB; ++b) {
            sparse_blk_val v;
            sparse_blk_decode<B>(data + i*nb1, c + b, v);
            for (int t = 0; t < NT; ++t) {
                B::axpy(v, ht[t], acc[t][2*b], acc[t][2*b + 1]);
            }
        }
    }
    for (int t = 0; t < NT; ++t) {
        for (int k = 0; k < 2*NB; ++k) {
            _mm512_storeu_ps(out + t*n_embd + c*32 + 16*k, acc[t][k]);
        }
    }
}

// rows [i0, i1) of blocks [c, c + NB) into every token, in groups of up to 6 tokens
template <typename B, int NB>
static void sparse_down_groups(const char * data, size_t nb1, const ggml_tensor * h,
        int64_t i0, int64_t i1, int64_t c, float * out, int64_t n_embd) {
    const int64_t n_tok = h->ne[1];
    const size_t  h_nb1 = h->nb[1];
    for (int64_t t = 0; t < n_tok; t += 6) {
        const float * ht = (const float *) ((const char *) h->data + t*h_nb1);
        float       * ot = out + t*n_embd;
        switch (std::min<int64_t>(6, n_tok - t)) {
            case 1:  sparse_down_group<B, NB, 1>(data, nb1, ht, h_nb1, i0, i1, c, ot, n_embd); break;
            case 2:  sparse_down_group<B, NB, 2>(data, nb1, ht, h_nb1, i0, i1, c, ot, n_embd); break;
            case 3:  sparse_down_group<B, NB, 3>(data, nb1, ht, h_nb1, i0, i1, c, ot, n_embd); break;
            case 4:  sparse_down_group<B, NB, 4>(data, nb1, ht, h_nb1, i0, i1, c, ot, n_embd); break;
            case 5:  sparse_down_group<B, NB, 5>(data, nb1, ht, h_nb1, i0, i1, c, ot, n_embd); break;
            default: sparse_down_group<B, NB, 6>(data, nb1, ht, h_nb1, i0, i1, c, ot, n_embd); break;
        }
    }
}

// Several tokens: 64 columns at a time, SPARSE_DOWN_ROWS rows at a time (their blocks stay in
// L1 while every token group goes over them)
static constexpr int64_t SPARSE_DOWN_ROWS = 128;

template <typename B>
static void sparse_down_tokens(const char * data, size_t nb1, const ggml_tensor * h,
        int64_t r0, int64_t r1, int64_t j0, int64_t j1, float * out, int64_t n_embd) {
    for (int64_t c = j0/32; c < j1/32; c += 2) {
        for (int64_t i0 = r0; i0 < r1; i0 += SPARSE_DOWN_ROWS) {
            const int64_t i1 = std::min(r1, i0 + SPARSE_DOWN_ROWS);
            if (c + 2 <= j1/32) {
                sparse_down_groups<B, 2>(data, nb1, h, i0, i1, c, out, n_embd);
            } else {
                sparse_down_groups<B, 1>(data, nb1, h, i0, i1, c, out, n_embd);
            }
        }
    }
}

// B: the float block; I: its integer path (void: none)
template <typename B, typename I = void>
static void sparse_down_block(const char * data, size_t nb1, const ggml_tensor * h,
        const std::vector<std::pair<int32_t, float>> & act, int64_t r0, int64_t r1, int64_t j0, int64_t j1, float * out, int64_t n_embd) {
    if constexpr (!std::is_void_v<I>) {
        sparse_down_int<I>(data, nb1, h, act, r0, r1, j0, j1, out, n_embd);
    } else if (h->ne[1] == 1) {
        sparse_down_rows<B>(data, nb1, act, j0, j1, out);
    } else {
        sparse_down_tokens<B>(data, nb1, h, r0, r1, j0, j1, out, n_embd);
    }
}

// the fast path of this type (sparse_down_has_fast) over the rows [r0, r1) and the columns
// [j0, j1) (whole 32-blocks) into out. act: a single token's active rows there and their h
static void sparse_down_fast(const ggml_tensor * dt, const ggml_tensor * h, const std::vector<std::pair<int32_t, float>> & act,
        int64_t r0, int64_t r1, int64_t j0, int64_t j1, float * out) {
    const char *  data   = (const char *) dt->data;
    const size_t  nb1    = dt->nb[1];
    const int64_t n_embd = dt->ne[0];
    switch (dt->type) {
        case GGML_TYPE_Q4_0: sparse_down_block<sparse_blk_q4_0, sparse_int_q4_0>(data, nb1, h, act, r0, r1, j0, j1, out, n_embd); break;
        case GGML_TYPE_Q4_1: sparse_down_block<sparse_blk_q4_1, sparse_int_q4_1>(data, nb1, h, act, r0, r1, j0, j1, out, n_embd); break;
        case GGML_TYPE_Q5_0: sparse_down_block<sparse_blk_q5_0, sparse_int_q5_0>(data, nb1, h, act, r0, r1, j0, j1, out, n_embd); break;
        case GGML_TYPE_Q8_0: sparse_down_block<sparse_blk_q8_0, sparse_int_q8_0>(data, nb1, h, act, r0, r1, j0, j1, out, n_embd); break;
        case GGML_TYPE_Q4_K: sparse_down_block<sparse_blk_q4_K, sparse_int_q4_K>(data, nb1, h, act, r0, r1, j0, j1, out, n_embd); break;
        case GGML_TYPE_Q5_K: sparse_down_block<sparse_blk_q5_K>(data, nb1, h, act, r0, r1, j0, j1, out, n_embd); break;
        case GGML_TYPE_Q6_K: sparse_down_block<sparse_blk_q6_K>(data, nb1, h, act, r0, r1, j0, j1, out, n_embd); break;
        case GGML_TYPE_F16:  sparse_down_block<sparse_blk_f16> (data, nb1, h, act, r0, r1, j0, j1, out, n_embd); break;
        case GGML_TYPE_BF16: sparse_down_block<sparse_blk_bf16>(data, nb1, h, act, r0, r1, j0, j1, out, n_embd); break;
        case GGML_TYPE_F32:  sparse_down_block<sparse_blk_f32> (data, nb1, h, act, r0, r1, j0, j1, out, n_embd); break;
        default:             GGML_ABORT("%s: no fast path for %s", __func__, ggml_type_name(dt->type));
    }
}

static bool sparse_down_has_fast(ggml_type type) {
    return type == GGML_TYPE_Q4_0 || type == GGML_TYPE_Q4_1 || type == GGML_TYPE_Q5_0 || type == GGML_TYPE_Q8_0 ||
           type == GGML_TYPE_Q4_K || type == GGML_TYPE_Q5_K || type == GGML_TYPE_Q6_K ||
           type == GGML_TYPE_F16  || type == GGML_TYPE_BF16 || type == GGML_TYPE_F32;
}
#else
static void sparse_down_fast(const ggml_tensor *, const ggml_tensor *, const std::vector<std::pair<int32_t, float>> &,
        int64_t, int64_t, int64_t, int64_t, float *) {
    GGML_ABORT("no fast path");
}

static bool sparse_down_has_fast(ggml_type) {
    return false;
}
#endif

// this thread's share [j0, j1) of n columns split in whole quantization blocks, 64 floats at
// least (sparse_down_parts splits a token's two halves' columns as 2 n_embd in a row)
static void sparse_down_columns(ggml_type type, int64_t n, int ith, int nth, int64_t & j0, int64_t & j1) {
    const int64_t blck = ggml_blck_size(type);
    const int64_t unit = blck >= 64 ? blck : 64/blck*blck;
    int64_t u0, u1;
    sparse_split((n + unit - 1)/unit, ith, nth, u0, u1);
    j0 = std::min(n, u0*unit);
    j1 = std::min(n, u1*unit);
}

// The fast paths sum the rows in two halves (split at a slab boundary), each from zero, the
// first into dst and the second into the work buffer, and then add them. A single token's
// threads share out the (half, columns) pairs, so with two threads each streams through one
// half's whole rows: split by columns, each thread read half of every row, 10-20 % slower
// from memory (Q8_0, Q4_0, Q4_K at the 7B shape). A batch's threads split the columns of
// both halves, each thread's part of a slab staying in L2 for all the tokens. The halves are
// fixed, so the sums do not depend on the thread count, and a token gets the same ones alone
// and in a batch.
static constexpr int SPARSE_DOWN_PARTS = 2;

static void sparse_down_parts(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * dt = dst->src[0];
    const ggml_tensor * h  = dst->src[1];

    const int64_t n_embd = dt->ne[0];
    const int64_t n_ff   = dt->ne[1];
    const int64_t n_tok  = h->ne[1];
    const int64_t n_slab = (n_ff + SPARSE_DOWN_SLAB - 1)/SPARSE_DOWN_SLAB;

    float * out  = (float *) dst->data;
    float * rest = (float *) params->wdata; // the second half's sums, [n_embd, n_tok]

    const int nth = params->nth;
    for (int p = 0; p < SPARSE_DOWN_PARTS; ++p) {
        int64_t j0, j1;
        if (n_tok == 1) {
            sparse_down_columns(dt->type, SPARSE_DOWN_PARTS*n_embd, params->ith, nth, j0, j1);
            j0 = std::clamp(j0 - p*n_embd, (int64_t) 0, n_embd);
            j1 = std::clamp(j1 - p*n_embd, (int64_t) 0, n_embd);
        } else {
            sparse_down_columns(dt->type, n_embd, params->ith, nth, j0, j1);
        }
        if (j0 >= j1) {
            continue;
        }
        float * o = p == 0 ? out : rest;
        for (int64_t t = 0; t < n_tok; ++t) {
            memset(o + t*n_embd + j0, 0, (j1 - j0)*sizeof(float));
        }
        const int64_t r0 = std::min(n_ff, n_slab*p/SPARSE_DOWN_PARTS*SPARSE_DOWN_SLAB);
        const int64_t r1 = std::min(n_ff, n_slab*(p + 1)/SPARSE_DOWN_PARTS*SPARSE_DOWN_SLAB);
        // one token: the active rows and their h, in row order
        thread_local std::vector<std::pair<int32_t, float>> act;
        act.clear();
        if (n_tok == 1) {
            const float * h0 = (const float *) h->data;
            for (int64_t i = r0; i < r1; ++i) {
                if (h0[i] != 0.0f) {
                    act.emplace_back((int32_t) i, h0[i]);
                }
            }
        }
        if (r0 < r1) {
            sparse_down_fast(dt, h, act, r0, r1, j0, j1, o);
        }
    }

    ggml_barrier(params->threadpool);

    int64_t j0, j1;
    sparse_down_columns(dt->type, n_embd, params->ith, nth, j0, j1);
    for (int64_t t = 0; t < n_tok && j0 < j1; ++t) {
        ggml_vec_acc_f32((int) (j1 - j0), out + t*n_embd + j0, rest + t*n_embd + j0);
    }
}

static void sparse_down(const ggml_compute_params * params, ggml_tensor * dst) {
    if (params->use_ref) {
        sparse_down_ref(params, dst);
        return;
    }

    const ggml_tensor * dt = dst->src[0];
    const ggml_tensor * h  = dst->src[1];

    const int64_t n_embd = dt->ne[0];
    const int64_t n_ff   = dt->ne[1];
    const int64_t n_tok  = h->ne[1];

    if (sparse_down_has_fast(dt->type) && n_embd % 32 == 0) {
        sparse_down_parts(params, dst);
        return;
    }

    // any other type: this thread's columns, row by row converted to floats
    int64_t j0, j1;
    sparse_down_columns(dt->type, n_embd, params->ith, params->nth, j0, j1);
    const int64_t nj = j1 - j0;
    if (nj == 0) {
        return;
    }

    float * out = (float *) dst->data;
    for (int64_t t = 0; t < n_tok; ++t) {
        memset(out + t*n_embd + j0, 0, nj*sizeof(float));
    }

    const size_t j0_off = ggml_row_size(dt->type, j0);
    float * buf = (float *) ((char *) params->wdata + params->ith*sparse_pad(n_embd*sizeof(float)));

    for (int64_t i = 0; i < n_ff; ++i) {
        const float * hi = (const float *) ((const char *) h->data + i*sizeof(float));
        bool any = false;
        for (int64_t t = 0; t < n_tok && !any; ++t) {
            any = *(const float *) ((const char *) hi + t*h->nb[1]) != 0.0f;
        }
        if (!any) {
            continue;
        }
        const char * row = (const char *) dt->data + i*dt->nb[1] + j0_off;
        const float * v = (const float *) row;
        if (dt->type != GGML_TYPE_F32) {
            sparse_row_to_float(dt->type, row, buf, nj);
            v = buf;
        }
        for (int64_t t = 0; t < n_tok; ++t) {
            const float ht = *(const float *) ((const char *) hi + t*h->nb[1]);
            if (ht != 0.0f) {
                ggml_vec_mad_f32((int) nj, out + t*n_embd + j0, v, ht);
            }
        }
    }
}

//
// MUL_MAT hinted GGML_SPARSE_HINT_PLAIN_WEIGHT: a large batch's dense product of gate or up,
// which the sparse ops keep out of repacked buffers. ggml's GEMM for repacked Q4_0 is faster
// than its product on the plain layout (tinyBLAS; 7B gate, 128 tokens: 51 against 86 ms, in
// docs/ARCHITECTURE.md), so each thread interleaves a
// tile of rows as repacking would (block_q4_0x8) into its slice of wdata, where it stays in
// cache, and runs that GEMM over every token.
//

#if defined(__AVX2__)
#include "repack.h"

static constexpr size_t SPARSE_PLAIN_TILE = 128*1024; // bytes of interleaved rows per tile

// rows per tile: a multiple of 16, the AVX-512 GEMM's width
static int64_t sparse_plain_tile_rows(int64_t n_embd) {
    const int64_t row = (int64_t) ggml_row_size(GGML_TYPE_Q4_0, n_embd);
    return std::max<int64_t>(16, (int64_t) SPARSE_PLAIN_TILE/row/16*16);
}

static bool sparse_plain_applies(const ggml_tensor * dst) {
    const ggml_tensor * w = dst->src[0];
    const ggml_tensor * x = dst->src[1];
    return ggml_get_op_params_i32(dst, 1) == GGML_SPARSE_HINT_PLAIN_WEIGHT &&
           w->type == GGML_TYPE_Q4_0 && ggml_is_matrix(w) && w->nb[0] == ggml_type_size(w->type) &&
           x->type == GGML_TYPE_F32 && ggml_is_matrix(x) && ggml_is_contiguous(x) && x->ne[1] >= 4 &&
           ggml_is_contiguous(dst);
}

static size_t sparse_plain_tile_size(int64_t n_embd) {
    return sparse_pad(sparse_plain_tile_rows(n_embd)*ggml_row_size(GGML_TYPE_Q4_0, n_embd));
}

// offset in wdata of thread ith's slice, after x as Q8_0: a tile, then the outputs of a last
// group of fewer than 8 rows (ith = n_threads: the work size)
static size_t sparse_plain_offset(const ggml_tensor * dst, int ith) {
    const int64_t n_embd = dst->src[0]->ne[0];
    const int64_t n_tok  = dst->src[1]->ne[1];
    const size_t  slice  = sparse_plain_tile_size(n_embd) + sparse_pad(8*n_tok*sizeof(float));
    return sparse_pad(ggml_row_size(GGML_TYPE_Q8_0, n_embd)*n_tok) + ith*slice;
}

// rows [0, n_rows) of w as ggml's block_q4_0x8 (repack.cpp's make_block_q4_0x8 with 8-byte
// interleave: 8 bytes of each row in turn, every nibble's top bit flipped), n_rows <= 8, the
// missing rows zero
static void sparse_interleave_q4_0x8(const char * w, size_t nb1, int64_t n_rows, int64_t nb, block_q4_0x8 * out) {
    for (int64_t b = 0; b < nb; ++b) {
        block_q4_0x8 & o = out[b];
        for (int64_t r = 0; r < 8; ++r) {
            if (r >= n_rows) {
                o.d[r] = 0;
                memset(o.qs + 8*r, 0, 8);
                memset(o.qs + 64 + 8*r, 0, 8);
                continue;
            }
            const block_q4_0 * src = (const block_q4_0 *) (w + r*nb1) + b;
            o.d[r] = src->d;
            for (int k = 0; k < 2; ++k) {
                uint64_t q;
                memcpy(&q, src->qs + 8*k, 8);
                q ^= 0x8888888888888888ULL;
                memcpy(o.qs + 64*k + 8*r, &q, 8);
            }
        }
    }
}

// nc interleaved rows (vx) times every token of xq into s (token t at s + t*bs): GEMM over the
// token quads, GEMV over the rest
static void sparse_plain_gemm(int64_t n_embd, float * s, int64_t bs, const block_q4_0x8 * vx, const char * xq,
        size_t xq_nb, int64_t n_quad, int64_t n_tok, int64_t nc) {
    if (n_quad > 0) {
        ggml_gemm_q4_0_8x8_q8_0((int) n_embd, s, bs, vx, xq, (int) n_quad, (int) nc);
    }
    for (int64_t t = n_quad; t < n_tok; ++t) {
        ggml_gemv_q4_0_8x8_q8_0((int) n_embd, s + t*bs, bs, vx, xq + t*xq_nb, 1, (int) nc);
    }
}

bool ggml_sparse_cpu_mul_mat(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    if (params->use_ref || !sparse_plain_applies(dst)) {
        return false;
    }
    if (sparse_plain_offset(dst, params->nth) > params->wsize) {
        return false; // planned without ggml_sparse_cpu_mul_mat_work_size
    }
    const ggml_tensor * w = dst->src[0];
    const ggml_tensor * x = dst->src[1];
    const int64_t n_embd = w->ne[0];
    const int64_t n_rows = w->ne[1];
    const int64_t n_tok  = x->ne[1];
    const int64_t nb     = n_embd/QK4_0;
    const int     ith    = params->ith;
    const int     nth    = params->nth;

    // x as Q8_0: 4 tokens at a time interleaved for the GEMM, the rest one by one for the GEMV
    char * xq = (char *) params->wdata;
    const size_t  xq_nb  = ggml_row_size(GGML_TYPE_Q8_0, n_embd);
    const int64_t n_quad = 4*(n_tok/4);
    for (int64_t t = 4*ith; t < n_quad; t += 4*nth) {
        ggml_quantize_mat_q8_0_4x8((const float *) ((const char *) x->data + t*x->nb[1]), xq + t*xq_nb, n_embd);
    }
    const ggml_from_float_t from_float = ggml_get_type_traits_cpu(GGML_TYPE_Q8_0)->from_float;
    for (int64_t t = n_quad + ith; t < n_tok; t += nth) {
        from_float((const float *) ((const char *) x->data + t*x->nb[1]), xq + t*xq_nb, n_embd);
    }
    ggml_barrier(params->threadpool);

    char * slice = (char *) params->wdata + sparse_plain_offset(dst, ith);
    block_q4_0x8 * tile = (block_q4_0x8 *) slice;
    float * part = (float *) (slice + sparse_plain_tile_size(n_embd));
    float * out  = (float *) dst->data;

    const int64_t tile_rows = sparse_plain_tile_rows(n_embd);
    int64_t g0, g1;
    sparse_split((n_rows + tile_rows - 1)/tile_rows, ith, nth, g0, g1);
    for (int64_t r0 = g0*tile_rows; r0 < std::min(n_rows, g1*tile_rows); r0 += tile_rows) {
        const int64_t nr = std::min(tile_rows, n_rows - r0);
        for (int64_t r = 0; r < nr; r += 8) {
            sparse_interleave_q4_0x8((const char *) w->data + (r0 + r)*w->nb[1], w->nb[1], std::min<int64_t>(8, nr - r), nb,
                                     tile + r/8*nb);
        }
        // whole groups of 8 rows straight into dst; a last partial one into part, its rows copied
        const int64_t nr8 = nr/8*8;
        if (nr8 > 0) {
            sparse_plain_gemm(n_embd, out + r0, n_rows, tile, xq, xq_nb, n_quad, n_tok, nr8);
        }
        if (nr > nr8) {
            sparse_plain_gemm(n_embd, part, 8, tile + nr8/8*nb, xq, xq_nb, n_quad, n_tok, 8);
            for (int64_t t = 0; t < n_tok; ++t) {
                memcpy(out + t*n_rows + r0 + nr8, part + 8*t, (nr - nr8)*sizeof(float));
            }
        }
    }
    return true;
}

size_t ggml_sparse_cpu_mul_mat_work_size(const struct ggml_tensor * node, int n_threads) {
    if (!sparse_plain_applies(node)) {
        return 0;
    }
    return sparse_plain_offset(node, n_threads);
}
#else
bool ggml_sparse_cpu_mul_mat(const struct ggml_compute_params *, struct ggml_tensor *) {
    return false;
}

size_t ggml_sparse_cpu_mul_mat_work_size(const struct ggml_tensor *, int) {
    return 0;
}
#endif

//
// dispatch
//

void ggml_sparse_compute_forward(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    switch (dst->op) {
        case GGML_OP_SPARSE_PREDICT: sparse_predict(params, dst); break;
        case GGML_OP_SPARSE_MUL_MAT: sparse_mul_mat(params, dst); break;
        case GGML_OP_SPARSE_MASK:    sparse_mask(params, dst);    break;
        case GGML_OP_SPARSE_DOWN:    sparse_down(params, dst);    break;
        default: GGML_ABORT("%s: not a sparse op: %s", __func__, ggml_op_name(dst->op));
    }
}

size_t ggml_sparse_work_size(const struct ggml_tensor * node, int n_threads) {
    switch (node->op) {
        case GGML_OP_SPARSE_PREDICT:
            return n_threads*sparse_pad(node->src[0]->ne[0]*node->src[1]->ne[1]*sizeof(uint32_t));
        case GGML_OP_SPARSE_MUL_MAT: {
            const ggml_tensor * w = node->src[0];
            const int64_t n_tok = node->src[1]->ne[1];
            const size_t fast = sparse_dot_x_offset(w, n_tok) + SPARSE_ALIGN +
                                n_tok*sparse_dot_n_vec(w)*sizeof(sparse_dot_x);
            const size_t ref  = n_threads*sparse_pad(w->ne[0]*sizeof(float));
            return std::max(fast, ref);
        }
        case GGML_OP_SPARSE_DOWN: // the generic path's rows as floats, or the fast paths' second half
            return std::max(n_threads*sparse_pad(node->src[0]->ne[0]*sizeof(float)),
                            sparse_pad(node->src[0]->ne[0]*node->src[1]->ne[1]*sizeof(float)));
        default:
            return 0;
    }
}

bool ggml_sparse_cpu_supports_op(const struct ggml_tensor * op) {
    const ggml_tensor * w = op->src[0];
    const bool readable = w->type == GGML_TYPE_F32 || ggml_get_type_traits(w->type)->to_float != nullptr;
    switch (op->op) {
        case GGML_OP_SPARSE_MUL_MAT: {
            const ggml_type_traits_cpu * traits = ggml_get_type_traits_cpu(w->type);
            return readable && traits->vec_dot != nullptr &&
                   (traits->vec_dot_type == GGML_TYPE_F32 || ggml_get_type_traits_cpu(traits->vec_dot_type)->from_float != nullptr);
        }
        case GGML_OP_SPARSE_DOWN:
            return readable;
        default:
            return true;
    }
}
