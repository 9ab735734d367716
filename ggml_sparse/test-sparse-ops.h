// llama-sparse: test-backend-ops cases for the sparse FFN ops (include/ggml-sparse.h).
//
// Included by tests/test-backend-ops.cpp (vendor/patches/0003-sparse-ggml-ops.patch)
// after its own test cases, so it uses test_case, init_tensor_uniform and nmse
// from there. `test-backend-ops -b CPU -o SPARSE_MUL_MAT` compares the fast CPU
// kernels with the dense-then-masked reference; on a GPU build the same cases
// compare the CUDA kernels with the CPU.
//
// `sparsity` is the fraction of neurons the input mask skips: rows of the
// mask (mul_mat) or of h (down) set to zero at random positions, a threshold
// at that quantile of the scores (mask), or a predictor alpha that skips
// about that fraction (predict: 0 disables the predictor).

#pragma once

#include "ggml-sparse.h"

#include <algorithm>
#include <random>

// random values with a fraction `sparsity` of exact zeros (each token its own pattern)
static std::vector<float> sparse_test_values(size_t n, float sparsity, bool ones, std::mt19937 & rng) {
    std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
    std::uniform_real_distribution<float> keep(0.0f, 1.0f);
    std::vector<float> v(n);
    for (auto & x : v) {
        x = keep(rng) < sparsity ? 0.0f : (ones ? 1.0f : uni(rng));
    }
    return v;
}

static void sparse_test_set(ggml_tensor * t, const std::vector<float> & v) {
    ggml_backend_tensor_set(t, v.data(), 0, v.size()*sizeof(float));
}

struct test_sparse_op : public test_case {
    const ggml_op   op;
    const ggml_type type;  // weight type (mul_mat, down)
    const int64_t   n_embd;
    const int64_t   n_ff;
    const int64_t   n_tok;
    const float     sparsity;
    const bool      masked; // mul_mat: with a mask (or NULL: every row)

    std::string op_desc(ggml_tensor * t) override {
        GGML_UNUSED(t);
        return ggml_op_name(op);
    }

    std::string vars() override {
        return VARS_TO_STR6(type, n_embd, n_ff, n_tok, sparsity, masked);
    }

    double max_nmse_err() override {
        // mul_mat quantizes x to the weight's dot-product type, as ggml's mat-vec does, and down's
        // integer path (these five types) each coefficient h*d to 8 bits; the rest is exact up to
        // summation order
        const bool int_down = op == GGML_OP_SPARSE_DOWN && (type == GGML_TYPE_Q4_0 || type == GGML_TYPE_Q4_1 ||
                                                            type == GGML_TYPE_Q5_0 || type == GGML_TYPE_Q8_0 ||
                                                            type == GGML_TYPE_Q4_K);
        return op == GGML_OP_SPARSE_MUL_MAT || int_down ? 5e-4 : 1e-6;
    }

    // an all-zero result (sparsity 1) must match exactly rather than pass as 0/0
    double err(const float * a, const float * b, size_t n) override {
        double ss = 0.0;
        double max_diff = 0.0;
        for (size_t i = 0; i < n; ++i) {
            ss += (double) a[i]*a[i] + (double) b[i]*b[i];
            max_diff = std::max(max_diff, (double) std::fabs(a[i] - b[i]));
        }
        return ss == 0.0 ? max_diff : nmse(a, b, n);
    }

    uint64_t op_flops(ggml_tensor * t) override {
        GGML_UNUSED(t);
        return op == GGML_OP_SPARSE_MUL_MAT || op == GGML_OP_SPARSE_DOWN ?
            (uint64_t) (2*n_embd*n_ff*n_tok*(1.0f - sparsity)) : 0;
    }

    test_sparse_op(ggml_op op, ggml_type type, int64_t n_embd, int64_t n_ff, int64_t n_tok, float sparsity, bool masked = true)
        : op(op), type(type), n_embd(n_embd), n_ff(n_ff), n_tok(n_tok), sparsity(sparsity), masked(masked) {}

    ggml_tensor * build_graph(ggml_context * ctx) override {
        ggml_tensor * out = nullptr;
        switch (op) {
            case GGML_OP_SPARSE_PREDICT: {
                ggml_tensor * sign   = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, (n_embd + 31)/32, n_ff);
                ggml_tensor * x      = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_embd, n_tok);
                ggml_tensor * params = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, GGML_SPARSE_N_PARAMS);
                ggml_set_name(sign, "sign");
                ggml_set_name(x, "x");
                ggml_set_name(params, "params");
                out = ggml_sparse_predict(ctx, sign, x, params);
            } break;
            case GGML_OP_SPARSE_MUL_MAT: {
                ggml_tensor * w    = ggml_new_tensor_2d(ctx, type, n_embd, n_ff);
                ggml_tensor * x    = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_embd, n_tok);
                ggml_tensor * mask = masked ? ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_ff, n_tok) : nullptr;
                ggml_set_name(w, "w");
                ggml_set_name(x, "x");
                if (mask) {
                    ggml_set_name(mask, "mask");
                }
                out = ggml_sparse_mul_mat(ctx, w, x, mask);
            } break;
            case GGML_OP_SPARSE_MASK: {
                ggml_tensor * a      = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_ff, n_tok);
                ggml_tensor * scale  = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_ff);
                ggml_tensor * params = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, GGML_SPARSE_N_PARAMS);
                ggml_set_name(a, "a");
                ggml_set_name(scale, "scale");
                ggml_set_name(params, "params");
                out = ggml_sparse_mask(ctx, a, scale, nullptr, params, GGML_SPARSE_POINT_UP);
            } break;
            case GGML_OP_SPARSE_DOWN: {
                ggml_tensor * down_t = ggml_new_tensor_2d(ctx, type, n_embd, n_ff);
                ggml_tensor * h      = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_ff, n_tok);
                ggml_set_name(down_t, "down_t");
                ggml_set_name(h, "h");
                out = ggml_sparse_down(ctx, down_t, h);
            } break;
            default:
                GGML_ABORT("not a sparse op");
        }
        ggml_set_name(out, "out");
        return out;
    }

    void initialize_tensors(ggml_context * ctx) override {
        std::mt19937 rng(1234);
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t != nullptr; t = ggml_get_next_tensor(ctx, t)) {
            const std::string name = ggml_get_name(t);
            if (name == "mask") {
                sparse_test_set(t, sparse_test_values(ggml_nelements(t), sparsity, true, rng));
            } else if (name == "h") {
                sparse_test_set(t, sparse_test_values(ggml_nelements(t), sparsity, false, rng));
            } else if (name == "sign") {
                // random bits, padding bits 0 as the converter writes them
                std::vector<uint32_t> bits(ggml_nelements(t));
                for (int64_t i = 0; i < t->ne[1]; ++i) {
                    for (int64_t w = 0; w < t->ne[0]; ++w) {
                        const int64_t valid = std::min<int64_t>(32, n_embd - 32*w);
                        bits[i*t->ne[0] + w] = (uint32_t) rng() & (valid == 32 ? ~0u : (1u << valid) - 1);
                    }
                }
                ggml_backend_tensor_set(t, bits.data(), 0, ggml_nbytes(t));
            } else if (name == "scale") {
                init_tensor_uniform(t, 0.0f, 1.0f);
            } else if (name == "params") {
                std::vector<float> p(GGML_SPARSE_N_PARAMS, 0.0f);
                // predictor: alpha 1 skips about half of random rows; a tiny alpha skips almost all
                p[0] = sparsity == 0.0f ? 0.0f : sparsity >= 1.0f ? 1e-9f : sparsity >= 0.9f ? 0.8f : 1.0f;
                if (op == GGML_OP_SPARSE_MASK) {
                    // the sparsity quantile of the scores |a| * scale
                    ggml_tensor * a     = ggml_get_tensor(ctx, "a");
                    ggml_tensor * scale = ggml_get_tensor(ctx, "scale");
                    std::vector<float> va(ggml_nelements(a)), vs(ggml_nelements(scale));
                    ggml_backend_tensor_get(a, va.data(), 0, ggml_nbytes(a));
                    ggml_backend_tensor_get(scale, vs.data(), 0, ggml_nbytes(scale));
                    std::vector<float> s(va.size());
                    for (size_t k = 0; k < va.size(); ++k) {
                        s[k] = std::fabs(va[k]) * vs[k % vs.size()];
                    }
                    std::sort(s.begin(), s.end());
                    const size_t q = std::min(s.size() - 1, (size_t) (sparsity * s.size()));
                    p[GGML_SPARSE_POINT_UP] = sparsity == 0.0f ? 0.0f : sparsity >= 1.0f ? 2.0f : s[q];
                }
                sparse_test_set(t, p);
            } else {
                init_tensor_uniform(t);
            }
        }
    }
};

// a case named `name` over one weight type and FFN shape, x rounded to the weight's
// dot-product type
struct test_sparse_shape : public test_case {
    const char *    name;
    const ggml_type type;
    const int64_t   n_embd;
    const int64_t   n_ff;
    const int64_t   n_tok;

    std::string op_desc(ggml_tensor * t) override {
        GGML_UNUSED(t);
        return name;
    }

    std::string vars() override {
        return VARS_TO_STR4(type, n_embd, n_ff, n_tok);
    }

    double max_nmse_err() override {
        return 5e-4;
    }

    test_sparse_shape(const char * name, ggml_type type, int64_t n_embd, int64_t n_ff, int64_t n_tok)
        : name(name), type(type), n_embd(n_embd), n_ff(n_ff), n_tok(n_tok) {}
};

// a whole sparse FFN (predict, gate, mask after gate, up, mask after up, down),
// compared node by node: the ops fed by each other's outputs. With several
// tokens each has its own params (sequences at different levels in one batch).
struct test_sparse_ffn : public test_sparse_shape {
    test_sparse_ffn(ggml_type type, int64_t n_embd, int64_t n_ff, int64_t n_tok)
        : test_sparse_shape("SPARSE_FFN", type, n_embd, n_ff, n_tok) {}

    ggml_tensor * build_graph(ggml_context * ctx) override {
        ggml_tensor * gate   = ggml_new_tensor_2d(ctx, type, n_embd, n_ff);
        ggml_tensor * up     = ggml_new_tensor_2d(ctx, type, n_embd, n_ff);
        ggml_tensor * down_t = ggml_new_tensor_2d(ctx, type, n_embd, n_ff);
        ggml_tensor * sign   = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, (n_embd + 31)/32, n_ff);
        ggml_tensor * scale  = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_ff);
        ggml_tensor * scale2 = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_ff); // point 2 scores as the model does: two scales
        ggml_tensor * x      = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_embd, n_tok);
        ggml_tensor * params = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, GGML_SPARSE_N_PARAMS, n_tok);
        ggml_set_name(sign, "sign");
        ggml_set_name(scale, "scale");
        ggml_set_name(scale2, "scale2");
        ggml_set_name(params, "params");

        ggml_tensor * m = ggml_sparse_predict(ctx, sign, x, params);
        ggml_tensor * g = ggml_sparse_mul_mat(ctx, gate, x, m);
        ggml_tensor * a = ggml_sparse_mask(ctx, ggml_silu(ctx, g), scale, scale2, params, GGML_SPARSE_POINT_GATE);
        ggml_tensor * u = ggml_sparse_mul_mat(ctx, up, x, a);
        ggml_tensor * h = ggml_sparse_mask(ctx, ggml_mul(ctx, a, u), scale, nullptr, params, GGML_SPARSE_POINT_UP);
        ggml_tensor * out = ggml_sparse_down(ctx, down_t, h);
        ggml_set_name(out, "out");
        return out;
    }

    void initialize_tensors(ggml_context * ctx) override {
        std::mt19937 rng(4321);
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t != nullptr; t = ggml_get_next_tensor(ctx, t)) {
            const std::string name = ggml_get_name(t);
            if (name == "sign") {
                std::vector<uint32_t> bits(ggml_nelements(t));
                for (auto & b : bits) {
                    b = (uint32_t) rng();
                }
                ggml_backend_tensor_set(t, bits.data(), 0, ggml_nbytes(t));
            } else if (name == "scale" || name == "scale2") {
                init_tensor_uniform(t, 0.0f, 1.0f);
            } else if (name == "params") {
                // token k: the predictor on every other token, thresholds growing with k
                std::vector<float> p;
                for (int64_t k = 0; k < n_tok; ++k) {
                    p.insert(p.end(), { k % 2 ? 0.0f : 1.0f, 0.02f + 0.03f*k, 0.02f + 0.03f*k, 0.0f });
                }
                sparse_test_set(t, p);
            } else {
                init_tensor_uniform(t);
            }
        }
    }
};

// ggml_sparse_mul_mat_plain: a large batch's dense gate or up, the hinted MUL_MAT against
// ggml's own (the reference)
struct test_sparse_mul_mat_plain : public test_sparse_shape {
    test_sparse_mul_mat_plain(ggml_type type, int64_t n_embd, int64_t n_ff, int64_t n_tok)
        : test_sparse_shape("SPARSE_MUL_MAT_PLAIN", type, n_embd, n_ff, n_tok) {}

    ggml_tensor * build_graph(ggml_context * ctx) override {
        ggml_tensor * w = ggml_new_tensor_2d(ctx, type, n_embd, n_ff);
        ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_embd, n_tok);
        ggml_tensor * out = ggml_sparse_mul_mat_plain(ctx, w, x);
        ggml_set_name(out, "out");
        return out;
    }
};

// every sparse op x every weight type GGUF models ship with x shapes (a
// small one, one whose sizes are multiples of no tile, a 7B FFN) x sparsity
static void make_test_cases_sparse(std::vector<std::unique_ptr<test_case>> & test_cases) {
    const std::vector<ggml_type> types = {
        GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1,
        GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K,
        GGML_TYPE_Q6_K, GGML_TYPE_IQ4_NL, GGML_TYPE_IQ4_XS,
    };
    // the types with fast paths, at the 7B shape (quantizing 45M random weights takes a while)
    const std::vector<ggml_type> fast_types = {
        GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0,
        GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K,
    };
    struct shape { int64_t n_embd, n_ff, n_tok; };
    const shape shapes[] = { {256, 1000, 1}, {512, 1377, 5}, {4096, 11008, 1} };
    const float sparsities[] = { 0.0f, 0.5f, 0.9f, 1.0f };

    for (const shape & s : shapes) {
        const bool big = s.n_embd*s.n_ff > 1000000;
        for (float sp : sparsities) {
            for (ggml_type type : big ? fast_types : types) {
                test_cases.emplace_back(new test_sparse_op(GGML_OP_SPARSE_MUL_MAT, type, s.n_embd, s.n_ff, s.n_tok, sp));
                test_cases.emplace_back(new test_sparse_op(GGML_OP_SPARSE_DOWN,    type, s.n_embd, s.n_ff, s.n_tok, sp));
            }
            test_cases.emplace_back(new test_sparse_op(GGML_OP_SPARSE_PREDICT, GGML_TYPE_F32, s.n_embd, s.n_ff, s.n_tok, sp));
            test_cases.emplace_back(new test_sparse_op(GGML_OP_SPARSE_MASK,    GGML_TYPE_F32, s.n_embd, s.n_ff, s.n_tok, sp));
        }
    }
    // a batch of several 6-token groups and a tail: the batched axpy (ggml-sparse-cpu.cpp)
    for (ggml_type type : { GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0,
                            GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K }) {
        test_cases.emplace_back(new test_sparse_op(GGML_OP_SPARSE_DOWN, type, 512, 1377, 13, 0.5f));
    }
    for (ggml_type type : types) {
        test_cases.emplace_back(new test_sparse_op(GGML_OP_SPARSE_MUL_MAT, type, 256, 1000, 3, 0.0f, false));
    }
    // rows that are not a whole number of SPARSE_DOWN tiles (GGML_SPARSE_DOWN_TILE, ggml-sparse-common.h)
    // nor of CUDA row blocks: SmolLM2's width for the 32-value blocks, an odd one for the float types
    for (ggml_type type : types) {
        for (int64_t n_embd : { 576, 583 }) {
            if (n_embd % ggml_blck_size(type) == 0) {
                test_cases.emplace_back(new test_sparse_op(GGML_OP_SPARSE_MUL_MAT, type, n_embd, 301, 3, 0.5f));
                test_cases.emplace_back(new test_sparse_op(GGML_OP_SPARSE_DOWN,    type, n_embd, 301, 3, 0.5f));
            }
        }
    }
    // predictor on widths that are not whole words
    for (int64_t n_embd : { 576, 583, 640 }) {
        test_cases.emplace_back(new test_sparse_op(GGML_OP_SPARSE_PREDICT, GGML_TYPE_F32, n_embd, 300, 2, 0.5f));
    }
    // the hinted dense product: token quads and a tail, tiles and a last group of fewer than 8
    // rows (Q4_0 at 512 wide: 448-row tiles), a 7B gate; Q4_K is left to ggml
    for (auto [n_embd, n_ff, n_tok] : { shape{256, 1000, 4}, {256, 1000, 9}, {512, 1377, 33}, {576, 301, 6},
                                        {4096, 11008, 20} }) {
        test_cases.emplace_back(new test_sparse_mul_mat_plain(GGML_TYPE_Q4_0, n_embd, n_ff, n_tok));
    }
    test_cases.emplace_back(new test_sparse_mul_mat_plain(GGML_TYPE_Q4_K, 512, 1377, 33));
    // F32 only: with x rounded to the weight's dot-product type (F16, Q8_*) a score within
    // rounding of a threshold lands on the other side now and then, and the chains diverge
    test_cases.emplace_back(new test_sparse_ffn(GGML_TYPE_F32, 256, 1000, 1));
    test_cases.emplace_back(new test_sparse_ffn(GGML_TYPE_F32, 512, 1377, 4));
}

// kernel speed at 7B and 70B FFN shapes, beside the dense mat-vec of the same weight
static void make_test_cases_sparse_perf(std::vector<std::unique_ptr<test_case>> & test_cases) {
    for (ggml_type type : { GGML_TYPE_Q4_0, GGML_TYPE_Q4_K, GGML_TYPE_Q5_0, GGML_TYPE_Q8_0, GGML_TYPE_F16 }) {
        for (auto [n_embd, n_ff] : { std::pair<int64_t, int64_t>{4096, 11008}, {8192, 28672} }) {
            test_cases.emplace_back(new test_mul_mat(type, GGML_TYPE_F32, n_ff, 1, n_embd, {1, 1}, {1, 1}));
            test_cases.emplace_back(new test_mul_mat(type, GGML_TYPE_F32, n_embd, 1, n_ff, {1, 1}, {1, 1}));
            for (float sp : { 0.0f, 0.5f, 0.7f, 0.9f }) {
                test_cases.emplace_back(new test_sparse_op(GGML_OP_SPARSE_MUL_MAT, type, n_embd, n_ff, 1, sp));
                test_cases.emplace_back(new test_sparse_op(GGML_OP_SPARSE_DOWN,    type, n_embd, n_ff, 1, sp));
            }
        }
    }
    // a prompt batch of 128 tokens at the 7B shape, dense (mode off): ggml's mul_mat on the plain
    // layout, the hinted one, and the axpy
    for (ggml_type type : { GGML_TYPE_Q4_0, GGML_TYPE_Q4_K, GGML_TYPE_Q8_0 }) {
        test_cases.emplace_back(new test_mul_mat(type, GGML_TYPE_F32, 11008, 128, 4096, {1, 1}, {1, 1}));
        test_cases.emplace_back(new test_sparse_mul_mat_plain(type, 4096, 11008, 128));
        test_cases.emplace_back(new test_sparse_op(GGML_OP_SPARSE_DOWN, type, 4096, 11008, 128, 0.0f));
    }
}
