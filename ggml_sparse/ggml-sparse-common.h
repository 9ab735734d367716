#pragma once

// llama-sparse: the rules and index mappings the CPU and CUDA kernels of the
// sparse ops share (ggml-sparse-cpu.cpp, ggml-sparse-cuda.cu). Written once
// here, as __host__ __device__ functions, so the CPU reference that
// test-backend-ops checks runs the same arithmetic and tiling as the GPU.

#include "ggml.h"

#include <stdint.h>

#ifdef __CUDACC__
#define GGML_SPARSE_HD __host__ __device__ __forceinline__
#else
#define GGML_SPARSE_HD inline
#endif

// column of the params tensor token t reads: one column for every token, or one per token
static GGML_SPARSE_HD int64_t ggml_sparse_param_col(int64_t params_ne1, int64_t t) {
    return params_ne1 == 1 ? 0 : t;
}

// mask point 1: 1 (compute the neuron) or 0 (skip it) from n_neg, the gate
// row's sign bits that disagree with x's; alpha <= 0 predicts nothing
static GGML_SPARSE_HD float ggml_sparse_predict_keep(float alpha, int64_t n_embd, int64_t n_neg) {
    return alpha > 0.0f && alpha * (float) (n_embd - n_neg) < (float) n_neg ? 0.0f : 1.0f;
}

// mask points 2 and 3: a where its weight-aware score |a| * (scale * scale2) reaches
// the threshold, else 0 (scale2 NULL: 1)
static GGML_SPARSE_HD float ggml_sparse_mask_value(float a, const float * scale, const float * scale2, int64_t i, float thr) {
    const float s = scale2 ? scale[i] * scale2[i] : scale[i];
    return a != 0.0f && (a < 0.0f ? -a : a) * s >= thr ? a : 0.0f;
}

// SPARSE_DOWN tiling: a CUDA block owns GGML_SPARSE_DOWN_TILE output columns of
// one token; each of its threads takes pairs of columns, pair p of a tile
// being the two elements dequantize(block, iqs) yields in ggml-cuda's
// get_rows/convert mapping (qk values per block, qr values per byte lane).
#define GGML_SPARSE_DOWN_TILE 256

// values per byte lane of the types ggml-cuda dequantizes by pairs: the
// 4- and 5-bit legacy quants pack columns i and i + qk/2 together; 1 for the rest
static GGML_SPARSE_HD int ggml_sparse_down_qr(enum ggml_type type) {
    return type == GGML_TYPE_Q4_0 || type == GGML_TYPE_Q4_1 || type == GGML_TYPE_Q5_0 || type == GGML_TYPE_Q5_1 ? 2 : 1;
}

// columns e0 and e1 (relative to a block-aligned tile start) of pair p, and
// the block and quant index that dequantize them
static GGML_SPARSE_HD void ggml_sparse_down_pair(int p, int qk, int qr, int & ib, int & iqs, int & e0, int & e1) {
    const int i00  = 2*p;
    const int iybs = i00 - i00 % qk;
    ib  = i00 / qk;
    iqs = (i00 % qk) / qr;
    e0  = iybs + iqs;
    e1  = e0 + (qr == 1 ? 1 : qk/2);
}
