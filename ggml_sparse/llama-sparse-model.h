#pragma once

// llama-sparse: loading sparse GGUF files (docs/FORMAT.md) and building their FFN.
//
// Internal to libllama: called from the upstream model code through the hooks
// in vendor/patches/ (llama-model.cpp and src/models/<arch>.cpp).

#include "llama-graph.h"

struct llama_layer;
struct llama_model;
struct llama_model_base;

// the sparse GGUF format version this build reads (`sparse.format_version`)
#define LLAMA_SPARSE_FORMAT_VERSION 1

// whether the model being loaded is a sparse GGUF (it has `sparse.format_version`)
bool llama_sparse_is_sparse(const llama_model & model);

// before the architecture creates its tensors: throws std::runtime_error for a
// sparse GGUF this build cannot run (format version, architecture, experts);
// does nothing for a dense model
void llama_sparse_check_model(const llama_model & model);

// creates layer il's FFN tensors of a sparse GGUF (gate, up, ffn_down_t and the
// per-neuron tensors; no ffn_down) with width hparams.n_ff(il), after checking
// each one's type and shape against the metadata: a malformed file throws
// std::runtime_error naming the tensor, what was expected and what was found
void llama_sparse_create_ffn(llama_model_base & model, llama_layer & layer, int il);

// the FFN of a sparse layer, computed densely from ffn_down_t (mode `off`):
// same activation and gating as llm_graph_context::build_ffn(type_op, type_gate)
ggml_tensor * llama_sparse_build_ffn(
        const llm_graph_context & gctx,
          const llama_layer & layer,
                ggml_tensor * cur,
            llm_ffn_op_type   type_op,
          llm_ffn_gate_type   type_gate,
                        int   il);
