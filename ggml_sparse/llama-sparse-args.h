#pragma once

// llama-sparse: the --sparse-mode, --sparsity and --sparse-alpha flags of every
// tool that parses common/arg.cpp's options (llama-cli, llama-completion,
// llama-server, llama-perplexity, ...). Included by common/arg.cpp
// (vendor/patches/0004-sparse-ffn-runtime.patch) and called with its add_opt.
//
// The flags set the process-wide defaults of llama-sparse.h, which every
// context created afterwards starts with, so no common_params field is needed.
// Values out of range are refused here; a level the model's table does not
// have (or the mode cannot reach) is refused when the context is created.

#include "arg.h"
#include "llama-sparse.h"

#include <stdexcept>
#include <string>

// the flags' values, checked; each throws std::invalid_argument with the reason

static llama_sparse_mode llama_sparse_parse_mode(const std::string & value) {
    const int32_t mode = llama_sparse_mode_from_name(value.c_str());
    if (mode < 0) {
        throw std::invalid_argument("unknown sparse mode '" + value + "' (off, threshold, predict or auto)");
    }
    return (llama_sparse_mode) mode;
}

static float llama_sparse_parse_number(const char * flag, const std::string & value) {
    size_t used = 0;
    float v = 0.0f;
    try {
        v = std::stof(value, &used);
    } catch (const std::exception &) {
        used = 0;
    }
    if (used == 0 || used != value.size()) {
        throw std::invalid_argument(std::string(flag) + " takes a number, got '" + value + "'");
    }
    return v;
}

static float llama_sparse_parse_level(const std::string & value) {
    const float level = llama_sparse_parse_number("--sparsity", value);
    if (!(level >= 0.0f && level < 1.0f)) {
        throw std::invalid_argument("--sparsity " + value + " is out of range: a fraction in [0, 1)");
    }
    return level;
}

static float llama_sparse_parse_alpha(const std::string & value) {
    const float alpha = llama_sparse_parse_number("--sparse-alpha", value);
    if (!(alpha > 0.0f && alpha < 1e6f)) {
        throw std::invalid_argument("--sparse-alpha " + value + " is out of range: it must be > 0");
    }
    return alpha;
}

template <typename AddOpt>
static void llama_sparse_add_args(AddOpt && add_opt) {
    add_opt(common_arg(
        {"--sparse-mode"}, "MODE",
        "FFN activation sparsity on a sparse GGUF (llama-sparse convert): off (dense, as upstream), "
        "threshold (skip neurons after the gate and after up), predict (also predict skipped neurons "
        "before the gate: for ReLU-family models), auto (off at sparsity 0, else the model's default "
        "mode; default: auto)",
        [](common_params &, const std::string & value) {
            llama_sparse_params p = llama_sparse_default_params();
            p.mode = llama_sparse_parse_mode(value);
            llama_sparse_set_defaults(p);
        }
    ).set_env("LLAMA_ARG_SPARSE_MODE"));
    add_opt(common_arg(
        {"--sparsity"}, "LEVEL",
        "sparsity level: the fraction of FFN weight bytes skipped per token, one of the levels in the "
        "sparse GGUF's table (llama-sparse inspect lists them) or 0 (default: 0)",
        [](common_params &, const std::string & value) {
            llama_sparse_params p = llama_sparse_default_params();
            p.level = llama_sparse_parse_level(value);
            llama_sparse_set_defaults(p);
        }
    ).set_env("LLAMA_ARG_SPARSITY"));
    add_opt(common_arg(
        {"--sparse-alpha"}, "F",
        "factor on the sign predictor's calibrated per-layer alpha in mode predict: larger skips fewer "
        "neurons (default: 1)",
        [](common_params &, const std::string & value) {
            llama_sparse_params p = llama_sparse_default_params();
            p.alpha = llama_sparse_parse_alpha(value);
            llama_sparse_set_defaults(p);
        }
    ).set_env("LLAMA_ARG_SPARSE_ALPHA"));
}
