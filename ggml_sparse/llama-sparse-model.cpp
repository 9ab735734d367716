#include "llama-sparse-model.h"

#include "llama-impl.h"
#include "llama-model.h"
#include "llama-model-loader.h"

#include <stdexcept>
#include <string>
#include <vector>

bool llama_sparse_is_sparse(const llama_model & model) {
    return model.gguf_kv.find("sparse.format_version") != model.gguf_kv.end();
}

void llama_sparse_check_model(const llama_model & model) {
    const auto it = model.gguf_kv.find("sparse.format_version");
    if (it == model.gguf_kv.end()) {
        return;
    }

    if (it->second != std::to_string(LLAMA_SPARSE_FORMAT_VERSION)) {
        throw std::runtime_error(format("sparse GGUF format version %s is not supported (this build reads version %d)",
                it->second.c_str(), LLAMA_SPARSE_FORMAT_VERSION));
    }

    switch (model.arch) {
        case LLM_ARCH_LLAMA:
        case LLM_ARCH_QWEN2:
        case LLM_ARCH_QWEN3:
        case LLM_ARCH_GEMMA2:
        case LLM_ARCH_GEMMA3:
            break;
        default:
            throw std::runtime_error(format("sparse GGUF of architecture %s is not supported (llama-sparse runs llama, qwen2, qwen3, gemma2 and gemma3)",
                    model.arch_name().c_str()));
    }

    if (model.hparams.n_expert > 0) {
        throw std::runtime_error("sparse GGUF with mixture-of-experts layers is not supported");
    }
}

// "[576, 1536]": the dimensions the tensor has, without the trailing 1s
static std::string llama_sparse_shape_str(const int64_t * ne, int n_dims) {
    std::string s = "[";
    for (int i = 0; i < n_dims; ++i) {
        s += (i ? ", " : "") + std::to_string(ne[i]);
    }
    return s + "]";
}

// types the dense product of llama_sparse_build_ffn accepts for ffn_down_t
static bool llama_sparse_down_t_type_ok(ggml_type type) {
    return type == GGML_TYPE_F32 || type == GGML_TYPE_F16 || type == GGML_TYPE_BF16 ||
        (ggml_is_quantized(type) && type != GGML_TYPE_Q8_1 && type != GGML_TYPE_Q8_K);
}

// throws unless the file has tensor `name` with shape `ne` and, unless type is GGML_TYPE_COUNT, that type;
// `why` says where the expected shape comes from
static void llama_sparse_check_tensor(const llama_model_loader & ml, const std::string & name,
        const std::vector<int64_t> & ne, ggml_type type, const std::string & why) {
    const ggml_tensor * cur = ml.get_tensor_meta(name.c_str());
    if (cur == nullptr) {
        throw std::runtime_error(format("sparse GGUF: tensor '%s' is missing", name.c_str()));
    }

    if (type != GGML_TYPE_COUNT && cur->type != type) {
        throw std::runtime_error(format("sparse GGUF: tensor '%s' has type %s, expected %s",
                name.c_str(), ggml_type_name(cur->type), ggml_type_name(type)));
    }

    bool ok = true;
    for (int i = 0; i < GGML_MAX_DIMS; ++i) {
        ok = ok && cur->ne[i] == (i < (int) ne.size() ? ne[i] : 1);
    }
    if (!ok) {
        throw std::runtime_error(format("sparse GGUF: tensor '%s' has shape %s, expected %s (%s)",
                name.c_str(), llama_sparse_shape_str(cur->ne, ggml_n_dims(cur)).c_str(),
                llama_sparse_shape_str(ne.data(), ne.size()).c_str(), why.c_str()));
    }
}

void llama_sparse_create_ffn(llama_model_base & model, llama_layer & layer, int il) {
    GGML_ASSERT(model.ml != nullptr);

    const llama_model_loader & ml = *model.ml;
    const llama_hparams & hparams = model.hparams;
    const LLM_TN & tn = model.tn;

    const int64_t n_embd = hparams.n_embd;
    const int64_t n_ff   = hparams.n_ff(il);
    const int64_t n_sign = (n_embd + 31)/32; // packed sign bits: one I32 word per 32 inputs

    if (n_ff <= 0) {
        throw std::runtime_error(format("sparse GGUF: feed_forward_length[%d] is %lld, a layer keeps at least one neuron",
                il, (long long) n_ff));
    }

    const std::string why_rows = format("n_embd = %lld, feed_forward_length[%d] = %lld", (long long) n_embd, il, (long long) n_ff);
    const std::string why_sign = format("ceil(n_embd/32) = %lld, feed_forward_length[%d] = %lld", (long long) n_sign, il, (long long) n_ff);
    const std::string why_vec  = format("feed_forward_length[%d] = %lld", il, (long long) n_ff);

    const std::string down = tn(LLM_TENSOR_FFN_DOWN, "weight", il);
    if (ml.get_tensor_meta(down.c_str()) != nullptr) {
        throw std::runtime_error(format("sparse GGUF: tensor '%s' must not be present (a sparse GGUF stores it transposed, as '%s')",
                down.c_str(), tn(LLM_TENSOR_FFN_DOWN_T, "weight", il).str().c_str()));
    }

    llama_sparse_check_tensor(ml, tn(LLM_TENSOR_FFN_GATE,         "weight", il), {n_embd, n_ff}, GGML_TYPE_COUNT, why_rows);
    llama_sparse_check_tensor(ml, tn(LLM_TENSOR_FFN_UP,           "weight", il), {n_embd, n_ff}, GGML_TYPE_COUNT, why_rows);
    llama_sparse_check_tensor(ml, tn(LLM_TENSOR_FFN_DOWN_T,       "weight", il), {n_embd, n_ff}, GGML_TYPE_COUNT, why_rows);
    llama_sparse_check_tensor(ml, tn(LLM_TENSOR_FFN_GATE_SIGN,    il), {n_sign, n_ff}, GGML_TYPE_I32, why_sign);
    llama_sparse_check_tensor(ml, tn(LLM_TENSOR_FFN_NEURON_INDEX, il), {n_ff},         GGML_TYPE_I32, why_vec);
    llama_sparse_check_tensor(ml, tn(LLM_TENSOR_FFN_DOWN_NORM,    il), {n_ff},         GGML_TYPE_F32, why_vec);
    llama_sparse_check_tensor(ml, tn(LLM_TENSOR_FFN_UP_ABSMEAN,   il), {n_ff},         GGML_TYPE_F32, why_vec);

    const std::string down_t = tn(LLM_TENSOR_FFN_DOWN_T, "weight", il);
    const ggml_type down_t_type = ml.get_tensor_meta(down_t.c_str())->type;
    if (!llama_sparse_down_t_type_ok(down_t_type)) {
        throw std::runtime_error(format("sparse GGUF: tensor '%s' has type %s, expected f32, f16, bf16 or a quantized weight type",
                down_t.c_str(), ggml_type_name(down_t_type)));
    }

    const int TENSOR_NOT_REQUIRED = llama_model_loader::TENSOR_NOT_REQUIRED;

    layer.ffn_gate         = model.create_tensor(tn(LLM_TENSOR_FFN_GATE,         "weight", il), {n_embd, n_ff}, 0);
    layer.ffn_up           = model.create_tensor(tn(LLM_TENSOR_FFN_UP,           "weight", il), {n_embd, n_ff}, 0);
    layer.ffn_down_t       = model.create_tensor(tn(LLM_TENSOR_FFN_DOWN_T,       "weight", il), {n_embd, n_ff}, 0);
    layer.ffn_gate_sign    = model.create_tensor(tn(LLM_TENSOR_FFN_GATE_SIGN,    il), {n_sign, n_ff}, 0);
    layer.ffn_neuron_index = model.create_tensor(tn(LLM_TENSOR_FFN_NEURON_INDEX, il), {n_ff}, 0);
    layer.ffn_down_norm    = model.create_tensor(tn(LLM_TENSOR_FFN_DOWN_NORM,    il), {n_ff}, 0);
    layer.ffn_up_absmean   = model.create_tensor(tn(LLM_TENSOR_FFN_UP_ABSMEAN,   il), {n_ff}, 0);

    // optional MLP bias: gate and up pruned and reordered like their rows, down unchanged
    layer.ffn_gate_b = model.create_tensor(tn(LLM_TENSOR_FFN_GATE, "bias", il), {n_ff},   TENSOR_NOT_REQUIRED);
    layer.ffn_up_b   = model.create_tensor(tn(LLM_TENSOR_FFN_UP,   "bias", il), {n_ff},   TENSOR_NOT_REQUIRED);
    layer.ffn_down_b = model.create_tensor(tn(LLM_TENSOR_FFN_DOWN, "bias", il), {n_embd}, TENSOR_NOT_REQUIRED);
}

ggml_tensor * llama_sparse_build_ffn(
        const llm_graph_context & gctx,
          const llama_layer & layer,
                ggml_tensor * cur,
            llm_ffn_op_type   type_op,
          llm_ffn_gate_type   type_gate,
                        int   il) {
    ggml_context * ctx0 = gctx.ctx0;

    GGML_ASSERT(layer.ffn_down_t != nullptr);

    // h = act(gate.x) * (up.x), exactly as upstream computes it: build_ffn without a down projection
    ggml_tensor * h = gctx.build_ffn(cur,
            layer.ffn_up,   layer.ffn_up_b,   layer.ffn_up_s,
            layer.ffn_gate, layer.ffn_gate_b, layer.ffn_gate_s,
            NULL,           NULL,             NULL,
            NULL,
            type_op, type_gate, il);

    // out[e] = sum_i h[i] * down_t[i][e]: ggml_out_prod(down_t, h^T). The CPU out_prod handles F32, F16 and
    // every quantized type (dequantizing one down_t row at a time into its work buffer), and a transposed h.
    // BF16 is cast to F32 first (once per graph evaluation: one extra pass over the whole matrix).
    //
    // Speed cost (mode off only; the sparse kernels replace this): out_prod splits its work over the output
    // columns, i.e. over tokens, so a single-token decode runs the down projection on one thread; and each
    // token dequantizes every row again, so a prompt batch costs n_tokens dequantizations of the matrix
    // instead of one quantized mat-mul.
    ggml_tensor * down_t = layer.ffn_down_t;
    if (down_t->type == GGML_TYPE_BF16) {
        down_t = ggml_cast(ctx0, down_t, GGML_TYPE_F32);
    }

    cur = ggml_out_prod(ctx0, down_t, ggml_transpose(ctx0, h));
    gctx.cb(cur, "ffn_down_t", il);

    if (layer.ffn_down_b) {
        cur = ggml_add(ctx0, cur, layer.ffn_down_b);
        gctx.cb(cur, "ffn_down_b", il);
    }

    return cur;
}
