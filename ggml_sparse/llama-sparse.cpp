// llama-sparse C API (include/llama-sparse.h): settings, levels and statistics.

#include "llama-sparse.h"
#include "llama-sparse-model.h"

#include "ggml-sparse.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

// levels are stored as f32 and written with one decimal or two: equal within this
static constexpr float LLAMA_SPARSE_LEVEL_EPS = 1e-4f;

// a level a mode reaches on the calibration text within this (what the converter allows)
static constexpr float LLAMA_SPARSE_REACH_TOL = 0.01f;

// the defaults before any llama_sparse_set_defaults: auto, 0, 1, or what the environment says
// (LLAMA_ARG_SPARSE_MODE, LLAMA_ARG_SPARSITY, LLAMA_ARG_SPARSE_ALPHA, as for the CLI flags), so
// that programs without the flags, llama-bench among them, can run sparse too. A value that does
// not parse becomes NaN or an invalid mode, which context creation refuses with a message.
static llama_sparse_params llama_sparse_env_defaults() {
    llama_sparse_params p = { LLAMA_SPARSE_MODE_AUTO, 0.0f, 1.0f };
    auto number = [](const char * s) {
        char * end = nullptr;
        const float v = strtof(s, &end);
        return end != s && *end == '\0' ? v : NAN;
    };
    if (const char * s = getenv("LLAMA_ARG_SPARSE_MODE")) {
        p.mode = (llama_sparse_mode) llama_sparse_mode_from_name(s);
    }
    if (const char * s = getenv("LLAMA_ARG_SPARSITY")) {
        p.level = number(s);
    }
    if (const char * s = getenv("LLAMA_ARG_SPARSE_ALPHA")) {
        p.alpha = number(s);
    }
    return p;
}

static std::mutex          g_defaults_mutex;
static llama_sparse_params g_defaults = llama_sparse_env_defaults();

const char * llama_sparse_version(void) {
    return LLAMA_SPARSE_VERSION;
}

bool llama_sparse_model_is_sparse(const struct llama_model * model) {
    char buf[16];
    return llama_model_meta_val_str(model, "sparse.format_version", buf, sizeof(buf)) >= 0;
}

const char * llama_sparse_mode_name(enum llama_sparse_mode mode) {
    switch (mode) {
        case LLAMA_SPARSE_MODE_OFF:       return "off";
        case LLAMA_SPARSE_MODE_THRESHOLD: return "threshold";
        case LLAMA_SPARSE_MODE_PREDICT:   return "predict";
        case LLAMA_SPARSE_MODE_AUTO:      return "auto";
    }
    return nullptr;
}

int32_t llama_sparse_mode_from_name(const char * name) {
    for (int mode = LLAMA_SPARSE_MODE_OFF; mode <= LLAMA_SPARSE_MODE_AUTO; ++mode) {
        if (name != nullptr && strcmp(name, llama_sparse_mode_name((llama_sparse_mode) mode)) == 0) {
            return mode;
        }
    }
    return -1;
}

struct llama_sparse_params llama_sparse_default_params(void) {
    std::lock_guard<std::mutex> lock(g_defaults_mutex);
    return g_defaults;
}

void llama_sparse_set_defaults(struct llama_sparse_params params) {
    std::lock_guard<std::mutex> lock(g_defaults_mutex);
    g_defaults = params;
}

int32_t llama_sparse_n_levels(const struct llama_model * model) {
    return model->sparse ? (int32_t) model->sparse->levels.size() : 0;
}

float llama_sparse_level(const struct llama_model * model, int32_t i) {
    GGML_ASSERT(i >= 0 && i < llama_sparse_n_levels(model));
    return model->sparse->levels[i];
}

float llama_sparse_level_achieved(const struct llama_model * model, enum llama_sparse_mode mode, int32_t i) {
    GGML_ASSERT(i >= 0 && i < llama_sparse_n_levels(model));
    GGML_ASSERT(mode == LLAMA_SPARSE_MODE_THRESHOLD || mode == LLAMA_SPARSE_MODE_PREDICT);
    return model->sparse->table(mode).achieved[i];
}

// mode auto resolved for the model
static llama_sparse_mode llama_sparse_resolve_mode(const llama_sparse_model * m, const llama_sparse_params & p) {
    if (p.mode != LLAMA_SPARSE_MODE_AUTO) {
        return p.mode;
    }
    if (p.level == 0.0f || m == nullptr) {
        return LLAMA_SPARSE_MODE_OFF;
    }
    return m->activation == "relu" || m->activation == "relu2" ? LLAMA_SPARSE_MODE_PREDICT : LLAMA_SPARSE_MODE_THRESHOLD;
}

static std::string llama_sparse_levels_str(const llama_sparse_model & m) {
    std::string s;
    for (float l : m.levels) {
        s += (s.empty() ? "" : ", ") + format("%g", l);
    }
    return s;
}

// the per-layer params tensor values for settings p, or throws std::runtime_error saying why p is invalid
static std::vector<float> llama_sparse_resolve(const llama_sparse_model * m, const llama_sparse_params & p) {
    if (llama_sparse_mode_name(p.mode) == nullptr) {
        throw std::runtime_error(format("unknown sparse mode %d", (int) p.mode));
    }
    if (!(p.level >= 0.0f && p.level < 1.0f)) {
        throw std::runtime_error(format("sparsity level %g is out of range: it is a fraction of FFN bytes in [0, 1)", p.level));
    }
    if (!(p.alpha > 0.0f) || !std::isfinite(p.alpha)) {
        throw std::runtime_error(format("sparse alpha %g is out of range: it must be > 0 (1 uses the calibrated alpha)", p.alpha));
    }

    const llama_sparse_mode mode = llama_sparse_resolve_mode(m, p);
    if (m == nullptr) {
        if (mode != LLAMA_SPARSE_MODE_OFF || p.level != 0.0f) {
            throw std::runtime_error("the model is a dense GGUF: sparse mode and level need a sparse GGUF (make one with `llama-sparse convert`)");
        }
        return {};
    }
    if (mode == LLAMA_SPARSE_MODE_OFF) {
        if (p.level != 0.0f) {
            throw std::runtime_error(format("sparsity level %g needs mode threshold or predict, not off", p.level));
        }
        return {};
    }

    // level 0: skip only exact zeros (thresholds 0, no predictor)
    std::vector<float> out(m->n_layer*GGML_SPARSE_N_PARAMS, 0.0f);
    if (p.level == 0.0f) {
        return out;
    }

    int lv = -1;
    for (size_t l = 0; l < m->levels.size(); ++l) {
        if (std::fabs(m->levels[l] - p.level) < LLAMA_SPARSE_LEVEL_EPS) {
            lv = (int) l;
        }
    }
    if (lv < 0) {
        throw std::runtime_error(format("sparsity level %g is not in this model's table (levels: 0, %s)",
                p.level, llama_sparse_levels_str(*m).c_str()));
    }

    const llama_sparse_table & t = m->table(mode);
    if (t.achieved[lv] < p.level - LLAMA_SPARSE_REACH_TOL) {
        float best = 0.0f;
        for (size_t l = 0; l < m->levels.size(); ++l) {
            if (t.achieved[l] >= m->levels[l] - LLAMA_SPARSE_REACH_TOL) {
                best = m->levels[l];
            }
        }
        const bool predict_reaches = m->predict.achieved[lv] >= p.level - LLAMA_SPARSE_REACH_TOL;
        throw std::runtime_error(format("mode %s cannot reach sparsity level %g on this model: it skips %.3f there%s; "
                "the highest level it reaches is %g%s",
                llama_sparse_mode_name(mode), p.level, t.achieved[lv],
                mode == LLAMA_SPARSE_MODE_THRESHOLD ? " (it always reads every gate row)" : "",
                best, mode == LLAMA_SPARSE_MODE_THRESHOLD && predict_reaches ? ", mode predict reaches this one" : ""));
    }

    for (int il = 0; il < m->n_layer; ++il) {
        float * lp = out.data() + il*GGML_SPARSE_N_PARAMS;
        const size_t k = (size_t) lv*m->n_layer + il;
        lp[0]                      = mode == LLAMA_SPARSE_MODE_PREDICT ? t.alpha[k]*p.alpha : 0.0f;
        lp[GGML_SPARSE_POINT_GATE] = t.gate[k];
        lp[GGML_SPARSE_POINT_UP]   = t.up[k];
    }
    return out;
}

// runs f, or puts the message of the std::exception it throws into err and returns -1
template <typename F>
static int32_t llama_sparse_try(F && f, char * err, size_t err_size) {
    try {
        f();
        return 0;
    } catch (const std::exception & e) {
        if (err != nullptr && err_size > 0) {
            snprintf(err, err_size, "%s", e.what());
        }
        return -1;
    }
}

int32_t llama_sparse_check(const struct llama_model * model, struct llama_sparse_params params, char * err, size_t err_size) {
    return llama_sparse_try([&] { llama_sparse_resolve(model->sparse.get(), params); }, err, err_size);
}

// valid settings p resolved for the model, or throws std::runtime_error saying why p is invalid
static llama_sparse_settings llama_sparse_settings_of(const llama_sparse_model * m, const llama_sparse_params & p) {
    llama_sparse_settings s;
    s.layer_params = llama_sparse_resolve(m, p);
    s.params       = p;
    s.params.mode  = llama_sparse_resolve_mode(m, p);
    return s;
}

llama_sparse_mode llama_sparse_context::graph_mode(const llama_ubatch & ubatch) const {
    llama_sparse_mode mode = settings.params.mode;
    if (seq_settings.empty() || ubatch.seq_id == nullptr) {
        return mode;
    }
    for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
        for (int32_t s = 0; s < ubatch.n_seq_id[i]; ++s) {
            mode = std::max(mode, of_seq(ubatch.seq_id[i][s]).params.mode);
        }
    }
    return mode;
}

std::shared_ptr<llama_sparse_context> llama_sparse_context_init(const llama_model & model) {
    auto sctx = std::make_shared<llama_sparse_context>();
    sctx->model = model.sparse;
    sctx->settings = llama_sparse_settings_of(sctx->model.get(), llama_sparse_default_params());
    const llama_sparse_params & p = sctx->settings.params;
    if (p.mode != LLAMA_SPARSE_MODE_OFF) {
        LLAMA_LOG_INFO("%s: sparse mode %s, level %g, alpha %g\n", __func__, llama_sparse_mode_name(p.mode), p.level, p.alpha);
    }
    return sctx;
}

int32_t llama_sparse_set(struct llama_context * ctx, struct llama_sparse_params params, char * err, size_t err_size) {
    llama_sparse_context & sctx = *ctx->get_cparams().sparse;
    return llama_sparse_try([&] { sctx.settings = llama_sparse_settings_of(sctx.model.get(), params); }, err, err_size);
}

struct llama_sparse_params llama_sparse_get(const struct llama_context * ctx) {
    return ctx->get_cparams().sparse->settings.params;
}

int32_t llama_sparse_set_seq(struct llama_context * ctx, llama_seq_id seq_id, const struct llama_sparse_params * params, char * err, size_t err_size) {
    llama_sparse_context & sctx = *ctx->get_cparams().sparse;
    if (params == nullptr) {
        sctx.seq_settings.erase(seq_id);
        return 0;
    }
    return llama_sparse_try([&] { sctx.seq_settings[seq_id] = llama_sparse_settings_of(sctx.model.get(), *params); }, err, err_size);
}

struct llama_sparse_params llama_sparse_get_seq(const struct llama_context * ctx, llama_seq_id seq_id) {
    return ctx->get_cparams().sparse->of_seq(seq_id).params;
}

void llama_sparse_set_stats(struct llama_context * ctx, bool enable) {
    llama_sparse_context & sctx = *ctx->get_cparams().sparse;
    if (sctx.stats != enable) {
        sctx.stats = enable;
        sctx.structure++;
    }
}

void llama_sparse_stats_reset(struct llama_context * ctx) {
    llama_sparse_context & sctx = *ctx->get_cparams().sparse;
    sctx.layer_counts.clear();
    sctx.seq_counts.clear();
    sctx.n_tokens = 0;
}

static float llama_sparse_skipped(const llama_sparse_counts & c) {
    return c.total > 0 ? (float) (1.0 - c.read/c.total) : -1.0f;
}

float llama_sparse_stats(const struct llama_context * ctx, float * layer_sparsity, int32_t n_layer) {
    const llama_sparse_context & sctx = *ctx->get_cparams().sparse;
    llama_sparse_counts all;
    for (size_t il = 0; il < sctx.layer_counts.size(); ++il) {
        all.read  += sctx.layer_counts[il].read;
        all.total += sctx.layer_counts[il].total;
        if (layer_sparsity != nullptr && (int32_t) il < n_layer) {
            layer_sparsity[il] = llama_sparse_skipped(sctx.layer_counts[il]);
        }
    }
    return llama_sparse_skipped(all);
}

double llama_sparse_stats_tokens(const struct llama_context * ctx) {
    return ctx->get_cparams().sparse->n_tokens;
}

float llama_sparse_seq_stats(const struct llama_context * ctx, llama_seq_id seq_id, double * n_tokens) {
    const llama_sparse_context & sctx = *ctx->get_cparams().sparse;
    const auto it = sctx.seq_counts.find(seq_id);
    const llama_sparse_counts c = it == sctx.seq_counts.end() ? llama_sparse_counts{} : it->second;
    if (n_tokens != nullptr) {
        *n_tokens = c.n_tokens;
    }
    return llama_sparse_skipped(c);
}

void llama_sparse_seq_stats_reset(struct llama_context * ctx, llama_seq_id seq_id) {
    ctx->get_cparams().sparse->seq_counts.erase(seq_id);
}
