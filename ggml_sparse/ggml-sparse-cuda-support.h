#pragma once

// llama-sparse: which sparse ops the CUDA kernels (ggml-sparse-cuda.cu) compute.
// Host-only, so a machine without a GPU can test the answers
// (tests/test_cuda.py); the kernels' dispatch expands the same type lists.

#include "ggml.h"

// The quantized types the skip-row product takes: X(TYPE, type) for each type with a
// vec_dot_<type>_q8_1 and a VDR_<TYPE>_Q8_1_MMVQ in ggml-cuda's vecdotq.cuh.
#define GGML_SPARSE_CUDA_MUL_MAT_Q_TYPES(X) \
    X(Q4_0, q4_0) X(Q4_1, q4_1) X(Q5_0, q5_0) X(Q5_1, q5_1) X(Q8_0, q8_0) \
    X(Q2_K, q2_K) X(Q3_K, q3_K) X(Q4_K, q4_K) X(Q5_K, q5_K) X(Q6_K, q6_K) \
    X(IQ4_NL, iq4_nl) X(IQ4_XS, iq4_xs)

// The types the sparse axpy takes: the float types and those ggml-cuda dequantizes by
// pairs of columns (the K-quants are dequantized whole blocks at a time: CPU).
#define GGML_SPARSE_CUDA_DOWN_TYPES(X) X(F32) X(F16) X(BF16) X(Q4_0) X(Q4_1) X(Q5_0) X(Q5_1) X(Q8_0)

static inline bool ggml_sparse_cuda_mul_mat_type(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_F32:
        case GGML_TYPE_F16:
        case GGML_TYPE_BF16:
#define X(T, t) case GGML_TYPE_##T:
        GGML_SPARSE_CUDA_MUL_MAT_Q_TYPES(X)
#undef X
            return true;
        default:
            return false;
    }
}

static inline bool ggml_sparse_cuda_down_type(enum ggml_type type) {
    switch (type) {
#define X(T) case GGML_TYPE_##T:
        GGML_SPARSE_CUDA_DOWN_TYPES(X)
#undef X
            return true;
        default:
            return false;
    }
}

// whether the CUDA backend computes op, one of the GGML_OP_SPARSE_* ops: its weight
// type, and rows of whole blocks read in place
static inline bool ggml_sparse_cuda_supports(const struct ggml_tensor * op) {
    const struct ggml_tensor * w = op->src[0];
    switch (op->op) {
        case GGML_OP_SPARSE_PREDICT:
        case GGML_OP_SPARSE_MASK:
            return true;
        case GGML_OP_SPARSE_MUL_MAT:
            return ggml_sparse_cuda_mul_mat_type(w->type) && ggml_is_contiguous_rows(w) && w->ne[0] % ggml_blck_size(w->type) == 0;
        case GGML_OP_SPARSE_DOWN:
            return ggml_sparse_cuda_down_type(w->type) && ggml_is_contiguous_rows(w) && w->ne[0] % ggml_blck_size(w->type) == 0;
        default:
            return false;
    }
}
