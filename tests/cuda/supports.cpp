// Prints the CUDA backend's supports_op answer for each sparse op and weight type
// (ggml-sparse-cuda-support.h), for ops built as the model loader builds them.
// Host code only: compiled and run by tests/test_cuda.py on machines without a GPU.

#include "ggml.h"
#include "ggml-sparse.h"
#include "ggml-sparse-cuda-support.h"

#include <cstdio>

int main() {
    const ggml_init_params ip = { 1024*ggml_tensor_overhead(), nullptr, /*no_alloc =*/ true };
    ggml_context * ctx = ggml_init(ip);

    const int64_t n_embd = 4096; // whole blocks of every type
    const int64_t n_ff   = 64;
    ggml_tensor * x      = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_embd, 1);
    ggml_tensor * h      = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_ff, 1);
    ggml_tensor * params = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, GGML_SPARSE_N_PARAMS);
    ggml_tensor * sign   = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_embd/32, n_ff);
    ggml_tensor * scale  = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_ff);

    printf("SPARSE_PREDICT - %d\n", ggml_sparse_cuda_supports(ggml_sparse_predict(ctx, sign, x, params)));
    printf("SPARSE_MASK - %d\n", ggml_sparse_cuda_supports(ggml_sparse_mask(ctx, h, scale, nullptr, params, GGML_SPARSE_POINT_UP)));
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const ggml_type type = (ggml_type) t;
        if (ggml_blck_size(type) == 0 || ggml_type_size(type) == 0 || n_embd % ggml_blck_size(type) != 0) {
            continue; // removed types
        }
        ggml_tensor * w = ggml_new_tensor_2d(ctx, type, n_embd, n_ff);
        printf("SPARSE_MUL_MAT %s %d\n", ggml_type_name(type), ggml_sparse_cuda_supports(ggml_sparse_mul_mat(ctx, w, x, nullptr)));
        printf("SPARSE_DOWN %s %d\n", ggml_type_name(type), ggml_sparse_cuda_supports(ggml_sparse_down(ctx, w, h)));
    }
    ggml_free(ctx);
    return 0;
}
