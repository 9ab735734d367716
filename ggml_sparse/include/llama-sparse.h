#pragma once

// llama-sparse C API. Everything sparse goes through these llama_sparse_*
// functions: upstream structs are never extended, because llama-cpp-python
// mirrors them byte for byte.
//
// A context on a sparse GGUF runs in one of the modes below at one sparsity
// level: the fraction of FFN weight bytes skipped per token, one of the
// levels of the model's threshold table (`sparse.levels`, docs/FORMAT.md) or
// 0 (skip only exact zeros: same result as dense). Settings can change
// between any two llama_decode calls.

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

    enum llama_sparse_mode {
        LLAMA_SPARSE_MODE_OFF       = 0, // upstream's dense FFN
        LLAMA_SPARSE_MODE_THRESHOLD = 1, // mask points after the gate and after up
        LLAMA_SPARSE_MODE_PREDICT   = 2, // ... and the sign-bit predictor before the gate
        LLAMA_SPARSE_MODE_AUTO      = 3, // off at level 0, else the model's default mode:
                                         // predict for ReLU-family activations, threshold otherwise
    };

    struct llama_sparse_params {
        enum llama_sparse_mode mode;
        float level; // 0 or a level of the model's table
        float alpha; // factor on the calibrated predictor alpha (> 0; 1: as calibrated, larger skips less)
    };

    // Version of the llama-sparse library, e.g. "0.1.0".
    LLAMA_API const char * llama_sparse_version(void);

    // Whether the model was written by the llama-sparse converter
    // (it has the `sparse.format_version` key).
    LLAMA_API bool llama_sparse_model_is_sparse(const struct llama_model * model);

    // "off", "threshold", "predict", "auto"; NULL for an invalid mode
    LLAMA_API const char * llama_sparse_mode_name(enum llama_sparse_mode mode);

    // the mode of that name, or -1
    LLAMA_API int32_t llama_sparse_mode_from_name(const char * name);

    // The settings contexts created from now on start with (process-wide;
    // initially mode auto, level 0, alpha 1, or what the environment variables
    // LLAMA_ARG_SPARSE_MODE, LLAMA_ARG_SPARSITY, LLAMA_ARG_SPARSE_ALPHA say).
    // The CLI flags --sparse-mode, --sparsity and --sparse-alpha set these.
    LLAMA_API struct llama_sparse_params llama_sparse_default_params(void);
    LLAMA_API void llama_sparse_set_defaults(struct llama_sparse_params params);

    // Levels of the model's table (0 for a dense model) and level i.
    LLAMA_API int32_t llama_sparse_n_levels(const struct llama_model * model);
    LLAMA_API float   llama_sparse_level(const struct llama_model * model, int32_t i);

    // The byte sparsity mode `mode` reached at level i on the calibration text.
    LLAMA_API float   llama_sparse_level_achieved(const struct llama_model * model, enum llama_sparse_mode mode, int32_t i);

    // Whether the settings are valid for the model: 0 if so, else -1 with the
    // reason in err (a dense model, a level not in the table or beyond what the
    // mode reaches, an alpha <= 0, an unknown mode).
    LLAMA_API int32_t llama_sparse_check(const struct llama_model * model, struct llama_sparse_params params, char * err, size_t err_size);

    // Change a context's settings (takes effect at the next decode): 0 or -1
    // as llama_sparse_check, and on -1 nothing changes.
    LLAMA_API int32_t llama_sparse_set(struct llama_context * ctx, struct llama_sparse_params params, char * err, size_t err_size);

    // The context's settings, with mode auto resolved.
    LLAMA_API struct llama_sparse_params llama_sparse_get(const struct llama_context * ctx);

    // Settings for the tokens of sequence seq_id alone (one server request,
    // say) instead of the context's; NULL returns the sequence to the
    // context's. 0 or -1 as llama_sparse_check, and on -1 nothing changes.
    // Sequences at different settings can share a batch: the ops take
    // per-token thresholds, and a batch is computed in the highest mode among
    // its sequences (off < threshold < predict), where a sequence in a lower
    // mode runs without the predictor, or, for mode off, skips only exact
    // zeros (the dense result within rounding).
    LLAMA_API int32_t llama_sparse_set_seq(struct llama_context * ctx, llama_seq_id seq_id, const struct llama_sparse_params * params, char * err, size_t err_size);

    // The settings sequence seq_id runs with, with mode auto resolved.
    LLAMA_API struct llama_sparse_params llama_sparse_get_seq(const struct llama_context * ctx, llama_seq_id seq_id);

    // Statistics: when enabled, every decode adds the FFN weight bytes it read
    // and would have read densely, per layer. Enabling costs a few small ops
    // per layer.
    LLAMA_API void llama_sparse_set_stats(struct llama_context * ctx, bool enable);
    LLAMA_API void llama_sparse_stats_reset(struct llama_context * ctx);

    // Achieved sparsity since the last reset (fraction of FFN weight bytes
    // skipped per token) over all layers; the first n_layer entries of
    // layer_sparsity (may be NULL) get each layer's. -1 when nothing was
    // counted (statistics off, no token decoded, mode off or a dense model).
    LLAMA_API float llama_sparse_stats(const struct llama_context * ctx, float * layer_sparsity, int32_t n_layer);

    // Tokens counted since the last reset.
    LLAMA_API double llama_sparse_stats_tokens(const struct llama_context * ctx);

    // Achieved sparsity of the tokens of sequence seq_id since its last reset
    // (or llama_sparse_stats_reset), -1 when nothing was counted; n_tokens
    // (may be NULL) gets the tokens counted.
    LLAMA_API float llama_sparse_seq_stats(const struct llama_context * ctx, llama_seq_id seq_id, double * n_tokens);
    LLAMA_API void  llama_sparse_seq_stats_reset(struct llama_context * ctx, llama_seq_id seq_id);

#ifdef __cplusplus
}
#endif
