// llama-sparse: CUDA kernels of the sparse FFN ops (include/ggml-sparse.h).
//
// Same semantics as the CPU kernels (ggml-sparse-cpu.cpp); the rules and the
// SPARSE_DOWN tiling are shared with the CPU reference through
// ggml-sparse-common.h, so test-backend-ops checks the same arithmetic on the
// CPU here and against the CPU on a GPU. Every kernel runs on the context's
// stream with no host synchronisation, so CUDA graphs keep working.
//
// Not yet run on a GPU (none on the build machines): scripts/gpu-check runs
// test-backend-ops for every op and type on the first machine that has one.

#include "ggml-sparse-cuda.cuh"

#include "ggml-sparse-common.h"
#include "ggml-sparse-cuda-support.h"
#include "ggml-sparse.h"

#include "ggml-cuda/dequantize.cuh"
#include "ggml-cuda/quantize.cuh"
#include "ggml-cuda/vecdotq.cuh"

#define SPARSE_ROWS_PER_BLOCK 4   // warps per block of the row kernels (one row each)
#define SPARSE_DOWN_WARPS     8   // warps per SPARSE_DOWN block
#define SPARSE_MASK_THREADS   256

static __device__ __forceinline__ float sparse_param(const float * params, int64_t ne1, int64_t nb1, int i, int64_t t) {
    return params[ggml_sparse_param_col(ne1, t)*(nb1/sizeof(float)) + i];
}

//
// GGML_OP_SPARSE_PREDICT
//
// k_sparse_pack_signs: grid (n_w, n_tok), one warp; lane j reads x[32 w + j]
// and __ballot_sync packs the 32 sign bits of word w (bit j = x < 0, padding
// 0), one coalesced 128-byte read per warp.
// k_sparse_predict: grid (ceil(n_ff / 4), n_tok), block (32, 4), one warp per
// gate row: lanes stride over the row's n_w words (coalesced), XOR with the
// token's packed signs, __popc, warp sum; lane 0 applies the predictor rule
// with the token's alpha.

static __global__ void k_sparse_pack_signs(const float * x, uint32_t * xs, int64_t n_embd, int64_t n_w, int64_t sx) {
    const int64_t w   = blockIdx.x;
    const int64_t t   = blockIdx.y;
    const int64_t col = 32*w + threadIdx.x;
    const bool    neg = col < n_embd && x[t*sx + col] < 0.0f;
    const uint32_t bits = __ballot_sync(0xffffffff, neg);
    if (threadIdx.x == 0) {
        xs[t*n_w + w] = bits;
    }
}

static __global__ void k_sparse_predict(const uint32_t * sign, const uint32_t * xs, const float * params, float * dst,
        int64_t n_embd, int64_t n_w, int64_t n_ff, int64_t p_ne1, int64_t p_nb1) {
    const int64_t row = (int64_t) blockIdx.x*SPARSE_ROWS_PER_BLOCK + threadIdx.y;
    const int64_t t   = blockIdx.y;
    if (row >= n_ff) {
        return;
    }
    int n_neg = 0;
    for (int64_t w = threadIdx.x; w < n_w; w += WARP_SIZE) {
        n_neg += __popc(sign[row*n_w + w] ^ xs[t*n_w + w]);
    }
    n_neg = warp_reduce_sum(n_neg);
    if (threadIdx.x == 0) {
        dst[t*n_ff + row] = ggml_sparse_predict_keep(sparse_param(params, p_ne1, p_nb1, 0, t), n_embd, n_neg);
    }
}

static void sparse_predict(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * sign   = dst->src[0];
    const ggml_tensor * x      = dst->src[1];
    const ggml_tensor * params = dst->src[2];

    const int64_t n_embd = x->ne[0];
    const int64_t n_tok  = x->ne[1];
    const int64_t n_w    = sign->ne[0];
    const int64_t n_ff   = sign->ne[1];

    cudaStream_t stream = ctx.stream();
    ggml_cuda_pool_alloc<uint32_t> xs(ctx.pool(), n_w*n_tok);

    k_sparse_pack_signs<<<dim3(n_w, n_tok), WARP_SIZE, 0, stream>>>(
        (const float *) x->data, xs.get(), n_embd, n_w, x->nb[1]/sizeof(float));
    k_sparse_predict<<<dim3((n_ff + SPARSE_ROWS_PER_BLOCK - 1)/SPARSE_ROWS_PER_BLOCK, n_tok), dim3(WARP_SIZE, SPARSE_ROWS_PER_BLOCK), 0, stream>>>(
        (const uint32_t *) sign->data, xs.get(), (const float *) params->data, (float *) dst->data,
        n_embd, n_w, n_ff, params->ne[1], params->nb[1]);
    CUDA_CHECK(cudaGetLastError());
}

//
// GGML_OP_SPARSE_MUL_MAT
//
// grid (ceil(n_ff / 4), n_tok), block (32, 4), one warp per (row, token).
// A masked row returns at once: the whole warp takes the same branch and the
// row's weights are never read. Quantized weights: x is quantized to Q8_1 on
// the device first (as mmvq does) and the lanes walk the row's blocks with
// ggml-cuda's own per-type dot products (vecdotq.cuh), vdr quants per lane
// and call; F32/F16/BF16: the lanes stride over the columns. Warp sum, lane 0
// writes.

typedef float (*sparse_vec_dot_t)(const void * __restrict__ vbq, const block_q8_1 * __restrict__ bq8_1, const int & kbx, const int & iqs);

// the dot product and quants per call of a type, as mmvq uses them; nullptr / 0 for other types
static constexpr __device__ sparse_vec_dot_t sparse_vec_dot(ggml_type type) {
    switch (type) {
#define X(T, t) case GGML_TYPE_##T: return vec_dot_##t##_q8_1;
        GGML_SPARSE_CUDA_MUL_MAT_Q_TYPES(X)
#undef X
        default: return nullptr;
    }
}

static constexpr __host__ __device__ int sparse_vdr(ggml_type type) {
    switch (type) {
#define X(T, t) case GGML_TYPE_##T: return VDR_##T##_Q8_1_MMVQ;
        GGML_SPARSE_CUDA_MUL_MAT_Q_TYPES(X)
#undef X
        default: return 0;
    }
}

// this warp's (row, token) of a skip-row product, or false when it has nothing to compute:
// past the last row, or a masked row, whose 0 it writes
static __device__ __forceinline__ bool sparse_row_begin(const float * mask, float * dst, int64_t n_ff, int64_t s_mask,
        int64_t & row, int64_t & t) {
    row = (int64_t) blockIdx.x*SPARSE_ROWS_PER_BLOCK + threadIdx.y;
    t   = blockIdx.y;
    if (row >= n_ff) {
        return false;
    }
    if (mask != nullptr && mask[t*s_mask + row] == 0.0f) {
        if (threadIdx.x == 0) {
            dst[t*n_ff + row] = 0.0f;
        }
        return false;
    }
    return true;
}

template <ggml_type type>
static __global__ void k_sparse_mul_mat_q(const void * w, const block_q8_1 * y, const float * mask, float * dst,
        int64_t n_ff, int64_t blocks_per_row, int64_t s_row, int64_t s_y, int64_t s_mask) {
    constexpr int qk  = ggml_cuda_type_traits<type>::qk;
    constexpr int qi  = ggml_cuda_type_traits<type>::qi;
    constexpr int vdr = sparse_vdr(type);
    constexpr sparse_vec_dot_t vec_dot = sparse_vec_dot(type);

    int64_t row, t;
    if (!sparse_row_begin(mask, dst, n_ff, s_mask, row, t)) {
        return;
    }

    const block_q8_1 * yt = y + t*s_y;
    float sum = 0.0f;
    for (int64_t kbx = threadIdx.x / (qi/vdr); kbx < blocks_per_row; kbx += vdr*WARP_SIZE/qi) {
        sum += vec_dot(w, &yt[kbx*(qk/QK8_1)], (int) (row*s_row + kbx), vdr*(threadIdx.x % (qi/vdr)));
    }
    sum = warp_reduce_sum(sum);
    if (threadIdx.x == 0) {
        dst[t*n_ff + row] = sum;
    }
}

template <typename T>
static __global__ void k_sparse_mul_mat_f(const T * w, const float * x, const float * mask, float * dst,
        int64_t n_embd, int64_t n_ff, int64_t s_row, int64_t s_x, int64_t s_mask) {
    int64_t row, t;
    if (!sparse_row_begin(mask, dst, n_ff, s_mask, row, t)) {
        return;
    }

    float sum = 0.0f;
    for (int64_t j = threadIdx.x; j < n_embd; j += WARP_SIZE) {
        sum += ggml_cuda_cast<float>(w[row*s_row + j]) * x[t*s_x + j];
    }
    sum = warp_reduce_sum(sum);
    if (threadIdx.x == 0) {
        dst[t*n_ff + row] = sum;
    }
}

template <ggml_type type>
static void sparse_mul_mat_q(const ggml_tensor * w, const block_q8_1 * y, int64_t s_y, const float * mask, int64_t s_mask,
        float * dst, int64_t n_tok, cudaStream_t stream) {
    const int64_t n_ff = w->ne[1];
    const dim3 grid((n_ff + SPARSE_ROWS_PER_BLOCK - 1)/SPARSE_ROWS_PER_BLOCK, n_tok);
    k_sparse_mul_mat_q<type><<<grid, dim3(WARP_SIZE, SPARSE_ROWS_PER_BLOCK), 0, stream>>>(
        w->data, y, mask, dst, n_ff, w->ne[0]/ggml_blck_size(w->type), w->nb[1]/ggml_type_size(w->type), s_y, s_mask);
}

template <typename T>
static void sparse_mul_mat_f(const ggml_tensor * w, const ggml_tensor * x, const float * mask, int64_t s_mask,
        float * dst, cudaStream_t stream) {
    const int64_t n_ff = w->ne[1];
    const dim3 grid((n_ff + SPARSE_ROWS_PER_BLOCK - 1)/SPARSE_ROWS_PER_BLOCK, x->ne[1]);
    k_sparse_mul_mat_f<T><<<grid, dim3(WARP_SIZE, SPARSE_ROWS_PER_BLOCK), 0, stream>>>(
        (const T *) w->data, (const float *) x->data, mask, dst, w->ne[0], n_ff, w->nb[1]/sizeof(T), x->nb[1]/sizeof(float), s_mask);
}

static void sparse_mul_mat(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * w    = dst->src[0];
    const ggml_tensor * x    = dst->src[1];
    const ggml_tensor * mask = dst->src[2];

    const int64_t n_embd = x->ne[0];
    const int64_t n_tok  = x->ne[1];

    cudaStream_t stream = ctx.stream();
    const float * m      = mask ? (const float *) mask->data : nullptr;
    const int64_t s_mask = mask ? mask->nb[1]/sizeof(float) : 0;
    float * out = (float *) dst->data;

    switch (w->type) {
        case GGML_TYPE_F32:  sparse_mul_mat_f<float>      (w, x, m, s_mask, out, stream); break;
        case GGML_TYPE_F16:  sparse_mul_mat_f<half>       (w, x, m, s_mask, out, stream); break;
        case GGML_TYPE_BF16: sparse_mul_mat_f<nv_bfloat16>(w, x, m, s_mask, out, stream); break;
        default: {
            // x as Q8_1, rows padded as mmvq pads them
            const int64_t n_embd_padded = GGML_PAD(n_embd, MATRIX_ROW_PADDING);
            ggml_cuda_pool_alloc<char> xq(ctx.pool(), n_tok*n_embd_padded*sizeof(block_q8_1)/QK8_1);
            const int64_t s_x = x->nb[1]/sizeof(float);
            quantize_row_q8_1_cuda((const float *) x->data, nullptr, xq.get(), w->type, n_embd, s_x, s_x*n_tok, s_x*n_tok,
                n_embd_padded, n_tok, 1, 1, stream);
            const block_q8_1 * y = (const block_q8_1 *) xq.get();
            const int64_t s_y = n_embd_padded/QK8_1;
            switch (w->type) {
#define X(T, t) case GGML_TYPE_##T: sparse_mul_mat_q<GGML_TYPE_##T>(w, y, s_y, m, s_mask, out, n_tok, stream); break;
                GGML_SPARSE_CUDA_MUL_MAT_Q_TYPES(X)
#undef X
                default: GGML_ABORT("%s: weight type %s is not supported", __func__, ggml_type_name(w->type));
            }
        } break;
    }
    CUDA_CHECK(cudaGetLastError());
}

//
// GGML_OP_SPARSE_MASK
//
// grid (ceil(n_ff / 256), n_tok), one thread per value: the shared rule with
// the token's threshold.

static __global__ void k_sparse_mask(const float * a, const float * scale, const float * scale2, const float * params, float * dst,
        int64_t n_ff, int64_t s_a, int point, int64_t p_ne1, int64_t p_nb1) {
    const int64_t i = (int64_t) blockIdx.x*SPARSE_MASK_THREADS + threadIdx.x;
    const int64_t t = blockIdx.y;
    if (i < n_ff) {
        dst[t*n_ff + i] = ggml_sparse_mask_value(a[t*s_a + i], scale, scale2, i, sparse_param(params, p_ne1, p_nb1, point, t));
    }
}

static void sparse_mask(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * a      = dst->src[0];
    const ggml_tensor * scale  = dst->src[1];
    const ggml_tensor * params = dst->src[2];
    const ggml_tensor * scale2 = dst->src[3];

    const int64_t n_ff = a->ne[0];
    const dim3 grid((n_ff + SPARSE_MASK_THREADS - 1)/SPARSE_MASK_THREADS, a->ne[1]);
    k_sparse_mask<<<grid, SPARSE_MASK_THREADS, 0, ctx.stream()>>>(
        (const float *) a->data, (const float *) scale->data, scale2 ? (const float *) scale2->data : nullptr,
        (const float *) params->data, (float *) dst->data,
        n_ff, a->nb[1]/sizeof(float), ggml_get_op_params_i32(dst, 0), params->ne[1], params->nb[1]);
    CUDA_CHECK(cudaGetLastError());
}

//
// GGML_OP_SPARSE_DOWN
//
// grid (ceil(n_embd / GGML_SPARSE_DOWN_TILE), n_tok), block (32, 8): a block
// owns one tile of 256 output columns of one token. Warp w takes the rows
// w, w + 8, ...; a row whose h is 0 is skipped by the whole warp (its weights
// are never read). Lane l accumulates, in registers, the column pairs l,
// l + 32, l + 64 and l + 96 of the tile (ggml_sparse_down_pair: ggml-cuda's
// dequantize mapping, so a lane's pair comes from one quant byte), reading the
// row's tile of blocks together with the other lanes. The 8 warps' partial
// sums then meet in shared memory and each thread sums one column over the
// warps: a fixed-order reduction, no atomics, deterministic.

// ggml_sparse_down_qr must name the packing ggml-cuda's dequantize functions use
static_assert(QR4_0 == 2 && QR4_1 == 2 && QR5_0 == 2 && QR5_1 == 2 && QR8_0 == 1, "ggml_sparse_down_qr is out of date");

template <ggml_type type>
static constexpr __host__ __device__ bool sparse_is_float_type() {
    return type == GGML_TYPE_F32 || type == GGML_TYPE_F16 || type == GGML_TYPE_BF16;
}

// values per block: 1 for the float types
template <ggml_type type>
static constexpr __host__ __device__ int sparse_qk() {
    if constexpr (sparse_is_float_type<type>()) {
        return 1;
    } else {
        return ggml_cuda_type_traits<type>::qk;
    }
}

template <ggml_type type>
static __device__ __forceinline__ void sparse_down_pair(const void * row, int64_t ib, int iqs, int64_t col0, int64_t col1, int64_t n_embd, float2 & v) {
    if constexpr (sparse_is_float_type<type>()) {
        using T = std::conditional_t<type == GGML_TYPE_F32, float, std::conditional_t<type == GGML_TYPE_F16, half, nv_bfloat16>>;
        const T * r = (const T *) row;
        v.x = ggml_cuda_cast<float>(r[col0]);
        v.y = col1 < n_embd ? ggml_cuda_cast<float>(r[col1]) : 0.0f;
    } else if constexpr (type == GGML_TYPE_Q4_0) {
        dequantize_q4_0(row, ib, iqs, v);
    } else if constexpr (type == GGML_TYPE_Q4_1) {
        dequantize_q4_1(row, ib, iqs, v);
    } else if constexpr (type == GGML_TYPE_Q5_0) {
        dequantize_q5_0(row, ib, iqs, v);
    } else if constexpr (type == GGML_TYPE_Q5_1) {
        dequantize_q5_1(row, ib, iqs, v);
    } else {
        static_assert(type == GGML_TYPE_Q8_0, "SPARSE_DOWN: unsupported type");
        dequantize_q8_0(row, ib, iqs, v);
    }
}

template <ggml_type type>
static __global__ void k_sparse_down(const char * down_t, const float * h, float * dst,
        int64_t n_embd, int64_t n_ff, int64_t nb_row, int64_t s_h) {
    constexpr int qk    = sparse_qk<type>();
    const     int qr    = ggml_sparse_down_qr(type);
    constexpr int PAIRS = GGML_SPARSE_DOWN_TILE/2/WARP_SIZE; // per lane

    const int64_t c0 = (int64_t) blockIdx.x*GGML_SPARSE_DOWN_TILE;
    const int64_t t  = blockIdx.y;

    float2 acc[PAIRS];
#pragma unroll
    for (int k = 0; k < PAIRS; ++k) {
        acc[k] = make_float2(0.0f, 0.0f);
    }

    for (int64_t i = threadIdx.y; i < n_ff; i += SPARSE_DOWN_WARPS) {
        const float hv = h[t*s_h + i];
        if (hv == 0.0f) {
            continue;
        }
        const char * row = down_t + i*nb_row;
#pragma unroll
        for (int k = 0; k < PAIRS; ++k) {
            int ib, iqs, e0, e1;
            ggml_sparse_down_pair(threadIdx.x + k*WARP_SIZE, qk, qr, ib, iqs, e0, e1);
            if (c0 + e0 < n_embd) {
                float2 v;
                sparse_down_pair<type>(row, c0/qk + ib, iqs, c0 + e0, c0 + e1, n_embd, v);
                acc[k].x += hv*v.x;
                acc[k].y += hv*v.y;
            }
        }
    }

    __shared__ float part[SPARSE_DOWN_WARPS][GGML_SPARSE_DOWN_TILE];
#pragma unroll
    for (int k = 0; k < PAIRS; ++k) {
        int ib, iqs, e0, e1;
        ggml_sparse_down_pair(threadIdx.x + k*WARP_SIZE, qk, qr, ib, iqs, e0, e1);
        part[threadIdx.y][e0] = acc[k].x;
        part[threadIdx.y][e1] = acc[k].y;
    }
    __syncthreads();

    for (int c = threadIdx.y*WARP_SIZE + threadIdx.x; c < GGML_SPARSE_DOWN_TILE; c += SPARSE_DOWN_WARPS*WARP_SIZE) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < SPARSE_DOWN_WARPS; ++w) {
            sum += part[w][c];
        }
        if (c0 + c < n_embd) {
            dst[t*n_embd + c0 + c] = sum;
        }
    }
}

template <ggml_type type>
static void sparse_down_type(const ggml_tensor * dt, const ggml_tensor * h, float * dst, cudaStream_t stream) {
    const int64_t n_embd = dt->ne[0];
    const dim3 grid((n_embd + GGML_SPARSE_DOWN_TILE - 1)/GGML_SPARSE_DOWN_TILE, h->ne[1]);
    k_sparse_down<type><<<grid, dim3(WARP_SIZE, SPARSE_DOWN_WARPS), 0, stream>>>(
        (const char *) dt->data, (const float *) h->data, dst, n_embd, dt->ne[1], dt->nb[1], h->nb[1]/sizeof(float));
}

static void sparse_down(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * dt = dst->src[0];
    const ggml_tensor * h  = dst->src[1];

    cudaStream_t stream = ctx.stream();
    float * out = (float *) dst->data;
    switch (dt->type) {
#define X(T) case GGML_TYPE_##T: sparse_down_type<GGML_TYPE_##T>(dt, h, out, stream); break;
        GGML_SPARSE_CUDA_DOWN_TYPES(X)
#undef X
        default: GGML_ABORT("%s: weight type %s is not supported", __func__, ggml_type_name(dt->type));
    }
    CUDA_CHECK(cudaGetLastError());
}

//
// dispatch
//

void ggml_sparse_cuda_forward(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    switch (dst->op) {
        case GGML_OP_SPARSE_PREDICT: sparse_predict(ctx, dst); break;
        case GGML_OP_SPARSE_MUL_MAT: sparse_mul_mat(ctx, dst); break;
        case GGML_OP_SPARSE_MASK:    sparse_mask(ctx, dst);    break;
        case GGML_OP_SPARSE_DOWN:    sparse_down(ctx, dst);    break;
        default: GGML_ABORT("%s: %s is not a sparse op", __func__, ggml_op_name(dst->op));
    }
}

bool ggml_sparse_cuda_supports_op(const ggml_tensor * op) {
    return ggml_sparse_cuda_supports(op);
}
