// llama-sparse: constructors of the sparse FFN ops (include/ggml-sparse.h).
// Compiled into ggml-base; the kernels are in ggml-sparse-cpu.cpp.

#include "ggml-sparse.h"
#include "ggml-impl.h"

// one column of params for all tokens, or one per token
static bool ggml_sparse_is_params(const struct ggml_tensor * params, int64_t n_tokens) {
    return params->type == GGML_TYPE_F32 && ggml_is_matrix(params) && params->ne[0] == GGML_SPARSE_N_PARAMS &&
        params->nb[0] == sizeof(float) && (params->ne[1] == 1 || params->ne[1] == n_tokens);
}

struct ggml_tensor * ggml_sparse_predict(
        struct ggml_context * ctx,
        struct ggml_tensor  * sign,
        struct ggml_tensor  * x,
        struct ggml_tensor  * params) {
    GGML_ASSERT(sign->type == GGML_TYPE_I32 && ggml_is_contiguous(sign) && ggml_is_matrix(sign));
    GGML_ASSERT(x->type == GGML_TYPE_F32 && ggml_is_matrix(x) && x->nb[0] == sizeof(float));
    GGML_ASSERT(sign->ne[0] == (x->ne[0] + 31)/32);
    GGML_ASSERT(ggml_sparse_is_params(params, x->ne[1]));

    struct ggml_tensor * result = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, sign->ne[1], x->ne[1]);

    result->op     = GGML_OP_SPARSE_PREDICT;
    result->src[0] = sign;
    result->src[1] = x;
    result->src[2] = params;

    return result;
}

struct ggml_tensor * ggml_sparse_mul_mat(
        struct ggml_context * ctx,
        struct ggml_tensor  * w,
        struct ggml_tensor  * x,
        struct ggml_tensor  * mask) {
    GGML_ASSERT(ggml_is_matrix(w) && w->nb[0] == ggml_type_size(w->type));
    GGML_ASSERT(x->type == GGML_TYPE_F32 && ggml_is_matrix(x) && x->nb[0] == sizeof(float));
    GGML_ASSERT(w->ne[0] == x->ne[0]);
    if (mask) {
        GGML_ASSERT(mask->type == GGML_TYPE_F32 && mask->nb[0] == sizeof(float));
        GGML_ASSERT(mask->ne[0] == w->ne[1] && mask->ne[1] == x->ne[1] && ggml_is_matrix(mask));
    }

    struct ggml_tensor * result = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, w->ne[1], x->ne[1]);

    result->op     = GGML_OP_SPARSE_MUL_MAT;
    result->src[0] = w;
    result->src[1] = x;
    result->src[2] = mask;

    return result;
}

struct ggml_tensor * ggml_sparse_mask(
        struct ggml_context * ctx,
        struct ggml_tensor  * a,
        struct ggml_tensor  * scale,
        struct ggml_tensor  * scale2,
        struct ggml_tensor  * params,
        enum ggml_sparse_point point) {
    GGML_ASSERT(a->type == GGML_TYPE_F32 && ggml_is_matrix(a) && a->nb[0] == sizeof(float));
    GGML_ASSERT(scale->type == GGML_TYPE_F32 && ggml_is_contiguous(scale) && ggml_nelements(scale) == a->ne[0]);
    GGML_ASSERT(scale2 == NULL || (scale2->type == GGML_TYPE_F32 && ggml_is_contiguous(scale2) && ggml_nelements(scale2) == a->ne[0]));
    GGML_ASSERT(ggml_sparse_is_params(params, a->ne[1]));
    GGML_ASSERT(point == GGML_SPARSE_POINT_GATE || point == GGML_SPARSE_POINT_UP);

    struct ggml_tensor * result = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, a->ne[0], a->ne[1]);

    ggml_set_op_params_i32(result, 0, point);

    result->op     = GGML_OP_SPARSE_MASK;
    result->src[0] = a;
    result->src[1] = scale;
    result->src[2] = params;
    result->src[3] = scale2;

    return result;
}

struct ggml_tensor * ggml_sparse_down(
        struct ggml_context * ctx,
        struct ggml_tensor  * down_t,
        struct ggml_tensor  * h) {
    GGML_ASSERT(ggml_is_matrix(down_t) && down_t->nb[0] == ggml_type_size(down_t->type));
    GGML_ASSERT(h->type == GGML_TYPE_F32 && ggml_is_matrix(h) && h->nb[0] == sizeof(float));
    GGML_ASSERT(down_t->ne[1] == h->ne[0]);

    struct ggml_tensor * result = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, down_t->ne[0], h->ne[1]);

    result->op     = GGML_OP_SPARSE_DOWN;
    result->src[0] = down_t;
    result->src[1] = h;

    return result;
}

struct ggml_tensor * ggml_sparse_mul_mat_plain(
        struct ggml_context * ctx,
        struct ggml_tensor  * w,
        struct ggml_tensor  * x) {
    struct ggml_tensor * result = ggml_mul_mat(ctx, w, x);
    ggml_set_op_params_i32(result, 1, GGML_SPARSE_HINT_PLAIN_WEIGHT);
    return result;
}
