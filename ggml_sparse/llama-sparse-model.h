#pragma once

// llama-sparse: loading sparse GGUF files (docs/FORMAT.md), the per-context
// sparsity settings, and the sparse FFN graph.
//
// Internal to libllama: called from the upstream model code through the hooks
// in vendor/patches/ (llama-model.cpp, llama-model-loader.cpp,
// llama-context.cpp and src/models/<arch>.cpp).

#include "llama-graph.h"
#include "ggml-sparse.h"
#include "llama-sparse.h"

#include <map>
#include <memory>
#include <string>
#include <vector>

struct llama_layer;
struct llama_model;
struct llama_model_base;

// the sparse GGUF format version this build reads (`sparse.format_version`)
#define LLAMA_SPARSE_FORMAT_VERSION 1

// ubatches of at most this many tokens use the skipping kernels; larger ones
// compute gate and up densely and apply the same masks (and the down projection
// rounds them differently)
#define LLAMA_SPARSE_MAX_SKIP_TOKENS GGML_SPARSE_MAX_SMALL_BATCH

// one mode's threshold table: [n_level * n_layer], level-major
struct llama_sparse_table {
    std::vector<float> alpha;    // mask point 1 (0: off)
    std::vector<float> gate;     // mask point 2
    std::vector<float> up;       // mask point 3
    std::vector<float> achieved; // [n_level] byte sparsity on the calibration sample
};

// what a sparse GGUF says about running it sparsely (model.sparse)
struct llama_sparse_model {
    int n_layer = 0;
    std::string activation;           // `sparse.activation`
    std::vector<float> levels;        // `sparse.levels`, increasing
    std::vector<float> predictor_alpha; // [n_layer], `sparse.predictor.alpha`
    llama_sparse_table threshold;
    llama_sparse_table predict;

    // bytes of one gate, up and ffn_down_t row of each layer: what skipping a row saves
    std::vector<std::array<double, 3>> row_bytes;
    std::vector<int64_t> n_ff;        // neurons kept per layer

    const llama_sparse_table & table(llama_sparse_mode mode) const {
        return mode == LLAMA_SPARSE_MODE_PREDICT ? predict : threshold;
    }
};

// settings resolved for the model: mode auto resolved, the params tensor values
struct llama_sparse_settings {
    llama_sparse_params params;
    std::vector<float> layer_params; // [n_layer * GGML_SPARSE_N_PARAMS] from the table (empty in mode off)
};

// FFN weight bytes read and the bytes a dense FFN reads
struct llama_sparse_counts {
    double read     = 0.0;
    double total    = 0.0;
    double n_tokens = 0.0;
};

// the sparsity settings and statistics of one llama_context (cparams.sparse)
struct llama_sparse_context {
    std::shared_ptr<const llama_sparse_model> model; // null for a dense model

    llama_sparse_settings settings;                         // the context's
    std::map<llama_seq_id, llama_sparse_settings> seq_settings; // sequences that override them

    bool stats = false;
    uint64_t structure = 0; // changes whenever statistics are switched, which needs a new graph

    // statistics since the last reset: per layer, and per sequence
    std::vector<llama_sparse_counts> layer_counts;
    std::map<llama_seq_id, llama_sparse_counts> seq_counts;
    double n_tokens = 0;

    const llama_sparse_settings & of_seq(llama_seq_id seq_id) const {
        const auto it = seq_settings.find(seq_id);
        return it == seq_settings.end() ? settings : it->second;
    }

    // the mode a ubatch is computed in: the highest of its sequences' modes
    llama_sparse_mode graph_mode(const llama_ubatch & ubatch) const;
};

// whether the model being loaded is a sparse GGUF (it has `sparse.format_version`)
bool llama_sparse_is_sparse(const llama_model & model);

// before the architecture creates its tensors: throws std::runtime_error for a
// sparse GGUF this build cannot run (format version, architecture, experts,
// malformed tables), else reads its tables into model.sparse; does nothing
// for a dense model
void llama_sparse_check_model(llama_model_base & model);

// creates layer il's FFN tensors of a sparse GGUF (gate, up, ffn_down_t and the
// per-neuron tensors; no ffn_down) with width hparams.n_ff(il), after checking
// each one's type and shape against the metadata: a malformed file throws
// std::runtime_error naming the tensor, what was expected and what was found
void llama_sparse_create_ffn(llama_model_base & model, llama_layer & layer, int il);

// a representative use of weight w by sparse op `op`, for the loader's choice
// of buffer type (llama-model-loader.cpp, weight_buft_supported)
ggml_tensor * llama_sparse_weight_op(ggml_context * ctx, ggml_tensor * w, ggml_op op);

// the settings of a new context: the process-wide defaults
// (llama_sparse_set_defaults); throws std::runtime_error when they do not
// fit the model
std::shared_ptr<llama_sparse_context> llama_sparse_context_init(const llama_model & model);

// the FFN of a sparse layer in the context's mode: upstream's dense FFN with
// ffn_down_t (mode off), or the sparse ops of ggml-sparse.h. Same activation
// and gating as llm_graph_context::build_ffn(type_op, type_gate).
ggml_tensor * llama_sparse_build_ffn(
        const llm_graph_context & gctx,
          const llama_layer & layer,
                ggml_tensor * cur,
            llm_ffn_op_type   type_op,
          llm_ffn_gate_type   type_gate,
                        int   il);

// after a graph was computed: adds its sparsity statistics to the context's
// (when they are enabled)
void llama_sparse_graph_done(llm_graph_result * res, ggml_backend_sched_t sched);
