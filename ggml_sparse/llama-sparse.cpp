#include "llama-sparse.h"

const char * llama_sparse_version(void) {
    return LLAMA_SPARSE_VERSION;
}

bool llama_sparse_model_is_sparse(const struct llama_model * model) {
    char buf[16];
    return llama_model_meta_val_str(model, "sparse.format_version", buf, sizeof(buf)) >= 0;
}
