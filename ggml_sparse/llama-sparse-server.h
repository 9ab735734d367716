#pragma once

// llama-sparse: sparsity in llama-server (tools/server/server-context.cpp),
// called from the hooks of vendor/patches/0005-sparse-server.patch.
//
// - A request may carry "sparsity": a level of the model's table, or 0, for
//   its own tokens (llama_sparse_set_seq on its slot's sequence); the mode
//   and alpha are the server's (--sparse-mode, --sparse-alpha).
// - A request's "model", when given, must name the served model or one of
//   its aliases.
// - Each response's timings carry "sparse_level" and "sparsity" (the
//   fraction of FFN weight bytes the request's tokens skipped); /metrics adds
//   llamacpp:sparse_sparsity and llamacpp:sparse_tokens_total.

#include "llama-sparse.h"

#include <algorithm>
#include <set>
#include <stdexcept>
#include <string>

// the level a request asks for, or -1 when it does not say; throws
// std::invalid_argument (a 400 response) when the model cannot run it
template <typename Json>
static float llama_sparse_server_level(const Json & data, const llama_model * model) {
    if (!data.contains("sparsity") || data.at("sparsity").is_null()) {
        return -1.0f;
    }
    if (!data.at("sparsity").is_number()) {
        throw std::invalid_argument("\"sparsity\" must be a number: 0 or a level of the model's table");
    }
    llama_sparse_params p = llama_sparse_default_params();
    p.level = data.at("sparsity").template get<float>();
    char err[512];
    if (llama_sparse_check(model, p, err, sizeof(err)) != 0) {
        throw std::invalid_argument(std::string("\"sparsity\": ") + err);
    }
    return p.level;
}

// why the request's "model" is not the served one, or "" when it is (or absent)
template <typename Json>
static std::string llama_sparse_server_unknown_model(const Json & data, const std::string & name, const std::set<std::string> & aliases) {
    if (!data.contains("model") || data.at("model").is_null()) {
        return "";
    }
    const std::string model = data.at("model").is_string() ? data.at("model").template get<std::string>() : data.at("model").dump();
    if (model == name || aliases.count(model) > 0) {
        return "";
    }
    return "model '" + model + "' not found: this server serves '" + name + "' (GET /v1/models)";
}

// the slot of sequence seq_id starts a request at `level` (-1: the server's
// settings); false with the reason in err when the model cannot run it
static bool llama_sparse_server_launch(llama_context * ctx, llama_seq_id seq_id, float level, std::string & err) {
    if (llama_sparse_model_is_sparse(llama_get_model(ctx))) {
        llama_sparse_set_stats(ctx, true);
    }
    llama_sparse_seq_stats_reset(ctx, seq_id);
    if (level < 0.0f) {
        llama_sparse_set_seq(ctx, seq_id, nullptr, nullptr, 0);
        return true;
    }
    llama_sparse_params p = llama_sparse_default_params();
    p.level = level;
    char buf[512];
    if (llama_sparse_set_seq(ctx, seq_id, &p, buf, sizeof(buf)) != 0) {
        err = buf;
        return false;
    }
    return true;
}

// the level sequence seq_id runs at and the sparsity its tokens achieved (0 when none was counted)
static void llama_sparse_server_seq_stats(const llama_context * ctx, llama_seq_id seq_id, float & level, float & sparsity) {
    level = llama_sparse_get_seq(ctx, seq_id).level;
    sparsity = std::max(0.0f, llama_sparse_seq_stats(ctx, seq_id, nullptr));
}
