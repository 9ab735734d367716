#pragma once

// llama-sparse: CUDA kernels of the sparse FFN ops (include/ggml-sparse.h),
// compiled into ggml-cuda; dispatched and offered by ggml-cuda.cu through
// vendor/patches/0006-sparse-cuda-ops.patch.

#include "ggml-cuda/common.cuh"

// computes dst, one of the GGML_OP_SPARSE_* ops, on ctx's stream
void ggml_sparse_cuda_forward(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

// whether ggml_sparse_cuda_forward computes op (its weight type, layout and shape)
bool ggml_sparse_cuda_supports_op(const ggml_tensor * op);
