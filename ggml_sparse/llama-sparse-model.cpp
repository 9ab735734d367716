#include "llama-sparse-model.h"

#include "ggml-sparse.h"

#include "llama-impl.h"
#include "llama-model.h"
#include "llama-model-loader.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

bool llama_sparse_is_sparse(const llama_model & model) {
    return model.gguf_kv.find("sparse.format_version") != model.gguf_kv.end();
}

// an F32 array key of n values (n == 0: any length); throws naming the key
static std::vector<float> llama_sparse_read_f32(const gguf_context * meta, const std::string & key, size_t n, const std::string & why) {
    const int64_t id = gguf_find_key(meta, key.c_str());
    if (id < 0) {
        throw std::runtime_error(format("sparse GGUF: key '%s' is missing", key.c_str()));
    }
    if (gguf_get_kv_type(meta, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(meta, id) != GGUF_TYPE_FLOAT32) {
        throw std::runtime_error(format("sparse GGUF: key '%s' is not an array of f32", key.c_str()));
    }
    const size_t len = gguf_get_arr_n(meta, id);
    if (n != 0 && len != n) {
        throw std::runtime_error(format("sparse GGUF: key '%s' has %zu values, expected %zu (%s)", key.c_str(), len, n, why.c_str()));
    }
    const float * data = (const float *) gguf_get_arr_data(meta, id);
    return std::vector<float>(data, data + len);
}

static std::shared_ptr<llama_sparse_model> llama_sparse_read_tables(const gguf_context * meta, uint32_t n_layer) {
    auto m = std::make_shared<llama_sparse_model>();
    m->n_layer = (int) n_layer;

    const int64_t act = gguf_find_key(meta, "sparse.activation");
    if (act < 0 || gguf_get_kv_type(meta, act) != GGUF_TYPE_STRING) {
        throw std::runtime_error("sparse GGUF: key 'sparse.activation' is missing or not a string");
    }
    m->activation = gguf_get_val_str(meta, act);
    if (m->activation != "silu" && m->activation != "gelu" && m->activation != "relu" && m->activation != "relu2") {
        throw std::runtime_error(format("sparse GGUF: sparse.activation '%s' is not one of silu, gelu, relu, relu2", m->activation.c_str()));
    }

    m->row_bytes.assign(n_layer, {0.0, 0.0, 0.0});
    m->n_ff.assign(n_layer, 0);

    // a file without a table (written without calibration) runs at level 0 only
    if (gguf_find_key(meta, "sparse.levels") < 0) {
        m->predictor_alpha.assign(n_layer, 0.0f);
        return m;
    }

    m->levels = llama_sparse_read_f32(meta, "sparse.levels", 0, "");
    for (size_t l = 0; l < m->levels.size(); ++l) {
        if (!(m->levels[l] > 0.0f && m->levels[l] < 1.0f) || (l > 0 && !(m->levels[l] > m->levels[l - 1]))) {
            throw std::runtime_error("sparse GGUF: sparse.levels must increase within (0, 1)");
        }
    }

    const size_t L = m->levels.size();
    const std::string why_layer = format("block_count = %u", n_layer);
    const std::string why_table = format("%zu levels * block_count %u", L, n_layer);
    const std::string why_level = format("%zu levels", L);
    m->predictor_alpha = llama_sparse_read_f32(meta, "sparse.predictor.alpha", n_layer, why_layer);
    for (auto * t : { &m->threshold, &m->predict }) {
        const std::string mode = t == &m->threshold ? "threshold" : "predict";
        if (t == &m->predict) {
            t->alpha = llama_sparse_read_f32(meta, "sparse.predict.alpha", L*n_layer, why_table);
        } else {
            t->alpha.assign(L*n_layer, 0.0f);
        }
        t->gate     = llama_sparse_read_f32(meta, "sparse." + mode + ".gate",     L*n_layer, why_table);
        t->up       = llama_sparse_read_f32(meta, "sparse." + mode + ".up",       L*n_layer, why_table);
        t->achieved = llama_sparse_read_f32(meta, "sparse." + mode + ".achieved", L,         why_level);
    }
    return m;
}

void llama_sparse_check_model(llama_model_base & model) {
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

    GGML_ASSERT(model.ml != nullptr);
    model.sparse = llama_sparse_read_tables(model.ml->metadata, model.hparams.n_layer_all);
}

// "[576, 1536]": the dimensions the tensor has, without the trailing 1s
static std::string llama_sparse_shape_str(const int64_t * ne, int n_dims) {
    std::string s = "[";
    for (int i = 0; i < n_dims; ++i) {
        s += (i ? ", " : "") + std::to_string(ne[i]);
    }
    return s + "]";
}

// weight types ffn_down_t may have (what ggml_sparse_down reads; Q8_1 and Q8_K are only activation types)
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

    // the *_SPARSE tensor ids: same names, but used by the sparse ops, so never placed in repacked buffers
    layer.ffn_gate         = model.create_tensor(tn(LLM_TENSOR_FFN_GATE_SPARSE,  "weight", il), {n_embd, n_ff}, 0);
    layer.ffn_up           = model.create_tensor(tn(LLM_TENSOR_FFN_UP_SPARSE,    "weight", il), {n_embd, n_ff}, 0);
    layer.ffn_down_t       = model.create_tensor(tn(LLM_TENSOR_FFN_DOWN_T,       "weight", il), {n_embd, n_ff}, 0);
    layer.ffn_gate_sign    = model.create_tensor(tn(LLM_TENSOR_FFN_GATE_SIGN,    il), {n_sign, n_ff}, 0);
    layer.ffn_neuron_index = model.create_tensor(tn(LLM_TENSOR_FFN_NEURON_INDEX, il), {n_ff}, 0);
    layer.ffn_down_norm    = model.create_tensor(tn(LLM_TENSOR_FFN_DOWN_NORM,    il), {n_ff}, 0);
    layer.ffn_up_absmean   = model.create_tensor(tn(LLM_TENSOR_FFN_UP_ABSMEAN,   il), {n_ff}, 0);

    // optional MLP bias: gate and up pruned and reordered like their rows, down unchanged
    layer.ffn_gate_b = model.create_tensor(tn(LLM_TENSOR_FFN_GATE, "bias", il), {n_ff},   TENSOR_NOT_REQUIRED);
    layer.ffn_up_b   = model.create_tensor(tn(LLM_TENSOR_FFN_UP,   "bias", il), {n_ff},   TENSOR_NOT_REQUIRED);
    layer.ffn_down_b = model.create_tensor(tn(LLM_TENSOR_FFN_DOWN, "bias", il), {n_embd}, TENSOR_NOT_REQUIRED);

    model.sparse->n_ff[il] = n_ff;
    model.sparse->row_bytes[il] = {
        (double) ggml_row_size(layer.ffn_gate->type,   n_embd),
        (double) ggml_row_size(layer.ffn_up->type,     n_embd),
        (double) ggml_row_size(layer.ffn_down_t->type, n_embd),
    };
}

ggml_tensor * llama_sparse_weight_op(ggml_context * ctx, ggml_tensor * w, ggml_op op) {
    ggml_tensor * params = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, GGML_SPARSE_N_PARAMS);
    switch (op) {
        case GGML_OP_SPARSE_PREDICT:
            return ggml_sparse_predict(ctx, w, ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 32*w->ne[0], 1), params);
        case GGML_OP_SPARSE_MUL_MAT:
            return ggml_sparse_mul_mat(ctx, w, ggml_new_tensor_2d(ctx, GGML_TYPE_F32, w->ne[0], 1), nullptr);
        case GGML_OP_SPARSE_DOWN:
            return ggml_sparse_down(ctx, w, ggml_new_tensor_2d(ctx, GGML_TYPE_F32, w->ne[1], 1));
        default:
            GGML_ABORT("%s: %s is not a sparse op with a weight", __func__, ggml_op_name(op));
    }
}

// the graph's sparse input: per-layer and per-token thresholds, and the statistics counters
class llm_graph_input_sparse : public llm_graph_input_i {
public:
    llm_graph_input_sparse(std::shared_ptr<llama_sparse_context> sctx, llama_sparse_mode mode) :
        sctx(std::move(sctx)), structure(this->sctx->structure), mode(mode) {}

    void set_input(const llama_ubatch * ubatch) override {
        const int64_t n_tokens = ubatch->n_tokens;
        tok_seq.resize(n_tokens);
        out_tok.clear();
        for (int64_t t = 0; t < n_tokens; ++t) {
            tok_seq[t] = ubatch->seq_id ? ubatch->seq_id[t][0] : 0;
            if (ubatch->output == nullptr || ubatch->output[t]) {
                out_tok.push_back((int32_t) t);
            }
        }
        if (params) {
            // token t of layer il at [il][t]: its sequence's values (mode off: all 0, skip exact zeros)
            const int64_t n_layer = params->ne[2];
            std::vector<float> data(ggml_nelements(params), 0.0f);
            for (int64_t t = 0; t < n_tokens; ++t) {
                const std::vector<float> & lp = sctx->of_seq(tok_seq[t]).layer_params;
                for (int64_t il = 0; il < n_layer && !lp.empty(); ++il) {
                    std::copy_n(lp.data() + il*GGML_SPARSE_N_PARAMS, GGML_SPARSE_N_PARAMS,
                            data.data() + (il*n_tokens + t)*GGML_SPARSE_N_PARAMS);
                }
            }
            ggml_backend_tensor_set(params, data.data(), 0, ggml_nbytes(params));
        }
    }

    // new levels only change the params values; a new mode or statistics need a new graph
    bool can_reuse(const llm_graph_params & gparams) override {
        return gparams.cparams.sparse == sctx && sctx->structure == structure && sctx->graph_mode(gparams.ubatch) == mode;
    }

    const std::shared_ptr<llama_sparse_context> sctx;
    const uint64_t structure;
    const llama_sparse_mode mode; // the mode the graph computes in

    ggml_tensor * params = nullptr; // F32 [GGML_SPARSE_N_PARAMS, n_tokens, n_layer] (sparse modes)

    // statistics, per layer: rows of gate, up and down read per token (null: every row)
    struct layer_counts {
        int il;
        ggml_tensor * rows[3];
        int64_t n_tokens;
    };
    std::vector<layer_counts> counts;

    // of the last ubatch: each token's (first) sequence, and the tokens that are outputs
    std::vector<llama_seq_id> tok_seq;
    std::vector<int32_t> out_tok;
};

static llm_graph_input_sparse * llama_sparse_graph_input(const llm_graph_context & gctx) {
    for (const auto & inp : gctx.res->inputs) {
        if (auto * s = dynamic_cast<llm_graph_input_sparse *>(inp.get())) {
            return s;
        }
    }
    const auto & sctx = gctx.cparams.sparse;
    GGML_ASSERT(sctx != nullptr);
    auto inp = std::make_unique<llm_graph_input_sparse>(sctx, sctx->graph_mode(gctx.ubatch));
    if (inp->mode != LLAMA_SPARSE_MODE_OFF) {
        inp->params = ggml_new_tensor_3d(gctx.ctx0, GGML_TYPE_F32, GGML_SPARSE_N_PARAMS, gctx.n_tokens, gctx.hparams.n_layer_all);
        ggml_set_name(inp->params, "sparse_params");
        ggml_set_input(inp->params);
    }
    return (llm_graph_input_sparse *) gctx.res->add_input(std::move(inp));
}

// layer il's params for the tokens of cur: all of the ubatch's, or (last layer) only the outputs
static ggml_tensor * llama_sparse_layer_params(const llm_graph_context & gctx, const llm_graph_input_sparse & inp,
        const ggml_tensor * cur, int il) {
    const int64_t n_tokens = inp.params->ne[1];
    ggml_tensor * p = ggml_view_2d(gctx.ctx0, inp.params, GGML_SPARSE_N_PARAMS, n_tokens,
            inp.params->nb[1], il*inp.params->nb[2]);
    if (cur->ne[1] == n_tokens) {
        return p;
    }
    for (const auto & in : gctx.res->inputs) {
        if (const auto * out = dynamic_cast<const llm_graph_input_out_ids *>(in.get())) {
            GGML_ASSERT(out->out_ids->ne[0] == cur->ne[1]);
            return ggml_get_rows(gctx.ctx0, p, out->out_ids);
        }
    }
    GGML_ABORT("llama-sparse: FFN of %lld tokens in a ubatch of %lld without output ids", (long long) cur->ne[1], (long long) n_tokens);
}

// the FFN activation: the architecture's, unless the file declares a ReLU-family one
static llm_ffn_op_type llama_sparse_activation(const llama_sparse_model & m, llm_ffn_op_type type_op) {
    if (m.activation == "relu") {
        return LLM_FFN_RELU;
    }
    if (m.activation == "relu2") {
        return LLM_FFN_RELU_SQR;
    }
    return type_op;
}

static ggml_tensor * llama_sparse_act(ggml_context * ctx, ggml_tensor * g, llm_ffn_op_type type_op) {
    switch (type_op) {
        case LLM_FFN_SILU:     return ggml_silu(ctx, g);
        case LLM_FFN_GELU:     return ggml_gelu(ctx, g);
        case LLM_FFN_RELU:     return ggml_relu(ctx, g);
        case LLM_FFN_RELU_SQR: return ggml_sqr(ctx, ggml_relu(ctx, g));
        default: GGML_ABORT("llama-sparse: FFN activation %d is not supported", (int) type_op);
    }
}

// act(g) * u in one op where ggml has it, as upstream's build_ffn computes it
static ggml_tensor * llama_sparse_act_mul(ggml_context * ctx, ggml_tensor * g, ggml_tensor * u, llm_ffn_op_type type_op) {
    switch (type_op) {
        case LLM_FFN_SILU: return ggml_swiglu_split(ctx, g, u);
        case LLM_FFN_GELU: return ggml_geglu_split(ctx, g, u);
        case LLM_FFN_RELU: return ggml_reglu_split(ctx, g, u);
        default:           return ggml_mul(ctx, llama_sparse_act(ctx, g, type_op), u);
    }
}

// rows of a [n_ff, n_tokens] mask or masked value tensor that are read per token: its nonzeros, [1, n_tokens]
static ggml_tensor * llama_sparse_count_nonzero(ggml_context * ctx, ggml_tensor * t, bool is_01) {
    return ggml_sum_rows(ctx, is_01 ? t : ggml_step(ctx, ggml_abs(ctx, t)));
}

ggml_tensor * llama_sparse_build_ffn(
        const llm_graph_context & gctx,
          const llama_layer & layer,
                ggml_tensor * cur,
            llm_ffn_op_type   type_op,
          llm_ffn_gate_type   type_gate,
                        int   il) {
    ggml_context * ctx0 = gctx.ctx0;
    const auto & sctx = gctx.cparams.sparse;

    GGML_ASSERT(layer.ffn_down_t != nullptr && sctx != nullptr && sctx->model != nullptr);
    GGML_ASSERT(type_gate == LLM_FFN_PAR);

    type_op = llama_sparse_activation(*sctx->model, type_op);

    llm_graph_input_sparse * inp = llama_sparse_graph_input(gctx);

    // docs/ARCHITECTURE.md, "Runtime": a small batch skips rows in the products (in mode off it
    // skips none, but the skipping product is faster than ggml's on weights that cannot be
    // repacked); a large one computes gate and up densely (ggml's mul_mat, hinted that the
    // weights are not repacked) and applies the same masks, so every token gets the same masks
    // either way (and sums rounded by other kernels).
    const bool skip = cur->ne[1] <= LLAMA_SPARSE_MAX_SKIP_TOKENS;

    // w.x (+ bias): skipping the rows where mask is 0 (small batch), or dense
    auto product = [&](ggml_tensor * w, ggml_tensor * b, ggml_tensor * mask, const char * name, const char * name_b) {
        ggml_tensor * y = skip ? ggml_sparse_mul_mat(ctx0, w, cur, mask) : ggml_sparse_mul_mat_plain(ctx0, w, cur);
        gctx.cb(y, name, il);
        if (b) {
            y = ggml_add(ctx0, y, b);
            gctx.cb(y, name_b, il);
        }
        return y;
    };

    ggml_tensor * h;
    if (inp->mode == LLAMA_SPARSE_MODE_OFF) {
        ggml_tensor * g = product(layer.ffn_gate, layer.ffn_gate_b, nullptr, "ffn_gate", "ffn_gate_b");
        ggml_tensor * u = product(layer.ffn_up,   layer.ffn_up_b,   nullptr, "ffn_up",   "ffn_up_b");
        h = llama_sparse_act_mul(ctx0, g, u, type_op);
        gctx.cb(h, "ffn_sparse_h", il);
    } else {
        // the three mask points
        const bool predict = inp->mode == LLAMA_SPARSE_MODE_PREDICT;

        ggml_tensor * p = llama_sparse_layer_params(gctx, *inp, cur, il);

        // point 1: the sign-bit predictor
        ggml_tensor * m = predict ? ggml_sparse_predict(ctx0, layer.ffn_gate_sign, cur, p) : nullptr;
        if (m) {
            gctx.cb(m, "ffn_sparse_predict", il);
        }

        ggml_tensor * g = product(layer.ffn_gate, layer.ffn_gate_b, m, "ffn_gate", "ffn_gate_b");
        if (m && (!skip || layer.ffn_gate_b)) {
            g = ggml_mul(ctx0, g, m); // skipped neurons' gate is 0, as the skipping product leaves it
        }

        // point 2: |act(g)| * (up_absmean * down_norm)
        ggml_tensor * a = llama_sparse_act(ctx0, g, type_op);
        a = ggml_sparse_mask(ctx0, a, layer.ffn_up_absmean, layer.ffn_down_norm, p, GGML_SPARSE_POINT_GATE);
        gctx.cb(a, "ffn_sparse_act", il);

        ggml_tensor * u = product(layer.ffn_up, layer.ffn_up_b, a, "ffn_up", "ffn_up_b");

        // point 3: |act(g) * u| * down_norm
        h = ggml_sparse_mask(ctx0, ggml_mul(ctx0, a, u), layer.ffn_down_norm, nullptr, p, GGML_SPARSE_POINT_UP);
        gctx.cb(h, "ffn_sparse_h", il);

        if (sctx->stats) {
            llm_graph_input_sparse::layer_counts c = { il, {
                m ? llama_sparse_count_nonzero(ctx0, m, true) : nullptr,
                llama_sparse_count_nonzero(ctx0, a, false),
                llama_sparse_count_nonzero(ctx0, h, false),
            }, cur->ne[1] };
            for (ggml_tensor * t : c.rows) {
                if (t) {
                    ggml_set_output(t);
                    ggml_build_forward_expand(gctx.gf, t);
                }
            }
            inp->counts.push_back(c);
        }
    }

    // out[e] = sum_i h[i] * down_t[i][e], reading only the rows where h[i] != 0
    cur = ggml_sparse_down(ctx0, layer.ffn_down_t, h);
    gctx.cb(cur, "ffn_down_t", il);

    if (layer.ffn_down_b) {
        cur = ggml_add(ctx0, cur, layer.ffn_down_b);
        gctx.cb(cur, "ffn_down_b", il);
    }

    return cur;
}

void llama_sparse_graph_done(llm_graph_result * res, ggml_backend_sched_t sched) {
    for (const auto & in : res->inputs) {
        auto * inp = dynamic_cast<llm_graph_input_sparse *>(in.get());
        if (inp == nullptr || inp->counts.empty()) {
            continue;
        }
        ggml_backend_sched_synchronize(sched);

        llama_sparse_context & sctx = *inp->sctx;
        const llama_sparse_model & m = *sctx.model;
        sctx.layer_counts.resize(m.n_layer);
        std::vector<float> rows;
        for (const auto & c : inp->counts) {
            const auto & rb = m.row_bytes[c.il];
            const double dense = (double) m.n_ff[c.il] * (rb[0] + rb[1] + rb[2]);
            // bytes read per token of this layer: gate, up and down rows
            std::vector<double> bytes(c.n_tokens, 0.0);
            for (int k = 0; k < 3; ++k) {
                rows.assign(c.n_tokens, (float) m.n_ff[c.il]);
                if (c.rows[k]) {
                    ggml_backend_tensor_get(c.rows[k], rows.data(), 0, c.n_tokens*sizeof(float));
                }
                for (int64_t t = 0; t < c.n_tokens; ++t) {
                    bytes[t] += rows[t] * rb[k];
                }
            }
            // the last layer may compute only the output tokens
            const bool all = c.n_tokens == (int64_t) inp->tok_seq.size();
            GGML_ASSERT(all || c.n_tokens == (int64_t) inp->out_tok.size());
            for (int64_t t = 0; t < c.n_tokens; ++t) {
                llama_sparse_counts & s = sctx.seq_counts[inp->tok_seq[all ? t : inp->out_tok[t]]];
                s.read  += bytes[t];
                s.total += dense;
                if (c.il == inp->counts.front().il) {
                    s.n_tokens += 1;
                }
                sctx.layer_counts[c.il].read  += bytes[t];
                sctx.layer_counts[c.il].total += dense;
            }
        }
        // count the batch once, by its first layer
        sctx.n_tokens += inp->counts.front().n_tokens;
    }
}
