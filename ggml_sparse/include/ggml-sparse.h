#pragma once

// llama-sparse: ggml ops for activation-sparse FFNs (docs/ARCHITECTURE.md, "Runtime").
//
// Four ops, appended to enum ggml_op by vendor/patches/0003-sparse-ggml-ops.patch:
//
//   GGML_OP_SPARSE_PREDICT  mask point 1: SparseInfer's sign-bit predictor
//   GGML_OP_SPARSE_MUL_MAT  skip-row matrix-vector product (gate and up)
//   GGML_OP_SPARSE_MASK     mask points 2 and 3: zero what a weight-aware score rates negligible
//   GGML_OP_SPARSE_DOWN     sparse axpy over the rows of ffn_down_t
//
// and a hint on ggml's MUL_MAT for the dense products of the same weights
// (ggml_sparse_mul_mat_plain).
//
// A neuron is skipped by the later ops when its value is 0: a mask is the
// zero pattern of the F32 tensor flowing through the FFN, so no op needs a
// separate boolean input. Thresholds live in a small F32 `params` tensor
// (a graph input) so they can change between evaluations without a rebuild:
//
//   params[0]  predictor alpha (<= 0: predict nothing, keep every neuron)
//   params[1]  threshold of mask point 2 (after the gate)
//   params[2]  threshold of mask point 3 (after up)
//
// params is [GGML_SPARSE_N_PARAMS, 1] (the same for every token) or
// [GGML_SPARSE_N_PARAMS, n_tokens] (column t for token t: sequences decoded in
// one batch at different levels), with contiguous columns.
//
// Every op has a fast CPU kernel and a dense-then-masked reference
// (ggml_sparse/ggml-sparse-cpu.cpp); test-backend-ops compares the two on
// the CPU backend and every other backend against the reference.

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

// SPARSE_DOWN sums each token of a batch of at most this many tokens exactly as it sums the
// token alone; a larger batch (a prompt) is rounded differently, in larger groups of rows
#define GGML_SPARSE_MAX_SMALL_BATCH 8

// number of floats in the params tensor the ops read
#define GGML_SPARSE_N_PARAMS 4

// index of the threshold in params, for ggml_sparse_mask
enum ggml_sparse_point {
    GGML_SPARSE_POINT_GATE = 1,
    GGML_SPARSE_POINT_UP   = 2,
};

// sign [ceil(n_embd/32), n_ff] I32 (packed gate signs, bit set = negative),
// x [n_embd, n_tokens] F32 -> F32 [n_ff, n_tokens]: 1 where the neuron is
// kept, 0 where it is skipped. With n_neg = popcount(sign(x) XOR sign_i) and
// n_pos = n_embd - n_neg, neuron i is skipped when alpha * n_pos < n_neg.
GGML_API struct ggml_tensor * ggml_sparse_predict(
        struct ggml_context * ctx,
        struct ggml_tensor  * sign,
        struct ggml_tensor  * x,
        struct ggml_tensor  * params);

// w [n_embd, n_ff] (any weight type), x [n_embd, n_tokens] F32, mask
// [n_ff, n_tokens] F32 or NULL -> F32 [n_ff, n_tokens]: w_i . x_t where
// mask[i, t] != 0, else 0 without reading row i. NULL: every row.
GGML_API struct ggml_tensor * ggml_sparse_mul_mat(
        struct ggml_context * ctx,
        struct ggml_tensor  * w,
        struct ggml_tensor  * x,
        struct ggml_tensor  * mask);

// a [n_ff, n_tokens] F32, scale and scale2 [n_ff] F32 (scale2 may be NULL: 1)
// -> F32 [n_ff, n_tokens]: a[i, t] where |a[i, t]| * (scale[i] * scale2[i]) >=
// params[point] and a[i, t] != 0, else 0. Two scales, so a weight-aware score
// that is a product of two per-neuron weights needs no separate op per
// evaluation. A value of exactly 0 always counts as skipped: it contributes
// nothing, so with a threshold of 0 the later ops skip exactly the neurons
// whose output is 0 (a ReLU's actual sparsity) and the result equals the
// dense one.
GGML_API struct ggml_tensor * ggml_sparse_mask(
        struct ggml_context * ctx,
        struct ggml_tensor  * a,
        struct ggml_tensor  * scale,
        struct ggml_tensor  * scale2,
        struct ggml_tensor  * params,
        enum ggml_sparse_point point);

// down_t [n_embd, n_ff] (any weight type, row i = neuron i's output vector),
// h [n_ff, n_tokens] F32 -> F32 [n_embd, n_tokens]: sum over i of
// h[i, t] * down_t_i, reading only the rows where h[i, t] != 0.
GGML_API struct ggml_tensor * ggml_sparse_down(
        struct ggml_context * ctx,
        struct ggml_tensor  * down_t,
        struct ggml_tensor  * h);

// w [n_embd, n_ff], x [n_embd, n_tokens] F32 -> F32 [n_ff, n_tokens]: ggml_mul_mat(w, x), the
// same op on every backend, with a hint (op_params[1], as ggml_mul_mat_set_hint) that w lives
// in a plain buffer because the sparse ops read it row by row. The CPU then computes a large
// batch with ggml's GEMM kernels for repacked weights, interleaving w on the fly in tiles that
// stay in cache (Q4_0 on AVX2 / AVX-512), and everything else as ggml_mul_mat.
GGML_API struct ggml_tensor * ggml_sparse_mul_mat_plain(
        struct ggml_context * ctx,
        struct ggml_tensor  * w,
        struct ggml_tensor  * x);

// the hint's value: far from upstream's small enum ggml_op_hint
#define GGML_SPARSE_HINT_PLAIN_WEIGHT 0x53504c57

#ifdef __cplusplus
}
#endif
