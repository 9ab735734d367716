#pragma once

// llama-sparse C API. Everything sparse goes through these llama_sparse_*
// functions: upstream structs are never extended, because llama-cpp-python
// mirrors them byte for byte.

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

    // Version of the llama-sparse library, e.g. "0.1.0".
    LLAMA_API const char * llama_sparse_version(void);

    // Whether the model was written by the llama-sparse converter
    // (it has the `sparse.format_version` key).
    LLAMA_API bool llama_sparse_model_is_sparse(const struct llama_model * model);

#ifdef __cplusplus
}
#endif
