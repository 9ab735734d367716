#pragma once

// llama-sparse: llama-bench's --sparse-mode, --sparsity and --sparse-alpha. Each
// takes a comma-separated list and is swept like llama-bench's other parameters:
// every combination is a test, with its own context. Included by
// tools/llama-bench/llama-bench.cpp (vendor/patches/0007-sparse-bench.patch).
//
// Values are checked by the same functions as the other tools' flags
// (llama-sparse-args.h); a level the model's table lacks, or its mode cannot
// reach, is refused with the reason before the test's context is created. A list not given takes
// the process default (LLAMA_ARG_SPARSE_MODE etc. in the environment, else auto,
// 0 and 1).

#include "llama-sparse-args.h"

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

struct llama_sparse_bench_params {
    std::vector<llama_sparse_mode> modes;
    std::vector<float>             levels;
    std::vector<float>             alphas;

    static bool is_arg(const std::string & arg) {
        return arg == "--sparse-mode" || arg == "--sparsity" || arg == "--sparse-alpha";
    }

    // append the comma-separated values of flag `arg`; throws std::invalid_argument on a bad one
    void add(const std::string & arg, const std::string & values) {
        size_t start = 0;
        while (start <= values.size()) {
            const size_t end = std::min(values.find(',', start), values.size());
            const std::string v = values.substr(start, end - start);
            if (arg == "--sparse-mode") {
                modes.push_back(llama_sparse_parse_mode(v));
            } else if (arg == "--sparsity") {
                levels.push_back(llama_sparse_parse_level(v));
            } else {
                alphas.push_back(llama_sparse_parse_alpha(v));
            }
            start = end + 1;
        }
    }

    // every combination, outermost the mode; mode off has no level (it runs once, at 0)
    std::vector<llama_sparse_params> sweep() const {
        const llama_sparse_params d = llama_sparse_default_params();
        const std::vector<llama_sparse_mode> ms = modes.empty()  ? std::vector<llama_sparse_mode>{ d.mode } : modes;
        const std::vector<float>             ls = levels.empty() ? std::vector<float>{ d.level } : levels;
        const std::vector<float>             as = alphas.empty() ? std::vector<float>{ d.alpha } : alphas;
        std::vector<llama_sparse_params> out;
        for (const auto m : ms) {
            for (const auto l : ls) {
                for (const auto a : as) {
                    const llama_sparse_params p = { m, m == LLAMA_SPARSE_MODE_OFF ? 0.0f : l, a };
                    const bool seen = std::any_of(out.begin(), out.end(), [&](const llama_sparse_params & q) {
                        return q.mode == p.mode && q.level == p.level && q.alpha == p.alpha;
                    });
                    if (!seen) {
                        out.push_back(p);
                    }
                }
            }
        }
        return out;
    }

    // the result columns the markdown table shows: the swept ones
    std::vector<std::string> shown_fields() const {
        std::vector<std::string> out;
        if (!modes.empty()) {
            out.emplace_back("sparse_mode");
        }
        if (!levels.empty()) {
            out.emplace_back("sparsity");
        }
        if (!alphas.empty()) {
            out.emplace_back("sparse_alpha");
        }
        return out;
    }

    static void print_usage() {
        printf("  --sparse-mode <off|threshold|predict|auto>        (default: auto) sparse GGUF mode\n");
        printf("  --sparsity <level>                                (default: 0) FFN sparsity level of a sparse GGUF\n");
        printf("  --sparse-alpha <f>                                (default: 1) factor on the predictor's alpha\n");
    }
};

// a float result field: as short as it reads (0.5, not 0.500000)
static std::string llama_sparse_bench_number(float v) {
    char buf[32];
    snprintf(buf, sizeof(buf), "%g", v);
    return buf;
}

// the next context gets this test's settings; false, with the reason on stderr, if the
// model refuses them (a dense model, a level not in its table, ...)
static bool llama_sparse_bench_apply(const llama_model * model, const llama_sparse_params & p) {
    char err[256];
    if (llama_sparse_check(model, p, err, sizeof(err)) != 0) {
        fprintf(stderr, "llama-bench: error: %s\n", err);
        return false;
    }
    llama_sparse_set_defaults(p);
    return true;
}
