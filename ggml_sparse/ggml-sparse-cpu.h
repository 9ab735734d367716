#pragma once

// llama-sparse: CPU kernels of the sparse FFN ops (include/ggml-sparse.h) and of
// the hinted MUL_MAT, called from ggml-cpu.c (vendor/patches/0003-sparse-ggml-ops.patch).

#include "ggml-cpu-impl.h"

#ifdef __cplusplus
extern "C" {
#endif

// compute one sparse op on the calling thread's share of the work
void ggml_sparse_compute_forward(const struct ggml_compute_params * params, struct ggml_tensor * dst);

// bytes of work buffer the op needs with n_threads threads
size_t ggml_sparse_work_size(const struct ggml_tensor * node, int n_threads);

// whether the CPU kernels handle the op's types
bool ggml_sparse_cpu_supports_op(const struct ggml_tensor * op);

// MUL_MAT with GGML_SPARSE_HINT_PLAIN_WEIGHT (ggml_sparse_mul_mat_plain): computes it and
// returns true where it has a kernel for it, else returns false and leaves it to ggml
bool ggml_sparse_cpu_mul_mat(const struct ggml_compute_params * params, struct ggml_tensor * dst);

// bytes of work buffer ggml_sparse_cpu_mul_mat needs (0 where it leaves the node to ggml)
size_t ggml_sparse_cpu_mul_mat_work_size(const struct ggml_tensor * node, int n_threads);

#ifdef __cplusplus
}
#endif
