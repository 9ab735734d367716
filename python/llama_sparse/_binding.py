"""Raw ctypes bindings of ggml_sparse/include/llama-sparse.h.

Like llama_cpp/llama_cpp.py: one binding per C function and nothing else.
Importing this module loads llama-cpp-python on *our* libllama (see
`load_llama_cpp`), so every llama_cpp object in the process runs on it.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from types import ModuleType

from ._paths import NotBuiltError, lib_dir


def load_llama_cpp() -> ModuleType:
    """Import llama_cpp with its library pointed at ours.

    llama-cpp-python reads LLAMA_CPP_LIB_PATH (libllama) and MTMD_CPP_LIB
    (libmtmd) when it is imported; both are set here, for this process and the
    processes it starts, so users never set them by hand.
    """
    ours = lib_dir()
    try:
        from . import _build
    except ImportError:
        _build = None
    if _build is None or not (ours / "libllama.so").exists():
        raise NotBuiltError(
            f"{ours / 'libllama.so'} does not exist: llama_sparse is imported from a source "
            "tree that was not built. Install it with `pip install .` (see README.md)."
        )
    loaded = sys.modules.get("llama_cpp.llama_cpp")
    if loaded is None:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(ours)
        os.environ["MTMD_CPP_LIB"] = str(ours)
        try:
            import llama_cpp
        except ModuleNotFoundError as e:
            raise ImportError(
                f"llama_sparse.Llama needs llama-cpp-python {_build.UPSTREAM_VERSION} installed "
                "without its own llama.cpp: run scripts/install from the llama-sparse checkout, "
                "or `pip install --no-cache-dir -C cmake.define.LLAMA_BUILD=OFF "
                f"-C cmake.define.LLAVA_BUILD=OFF llama-cpp-python=={_build.UPSTREAM_VERSION}`"
            ) from e
    import llama_cpp

    path = Path(llama_cpp.llama_cpp._lib._name).resolve()
    if path.parent != ours.resolve():
        raise ImportError(
            f"llama_cpp was imported before llama_sparse and loaded {path}; import llama_sparse "
            "first so that llama_cpp runs on the llama-sparse library"
        )
    if llama_cpp.__version__ != _build.UPSTREAM_VERSION:
        raise ImportError(
            f"llama-cpp-python {llama_cpp.__version__} is installed, but this llama-sparse is "
            f"built on {_build.UPSTREAM_VERSION}: their C structs must match exactly. Install "
            f"llama-cpp-python=={_build.UPSTREAM_VERSION} (scripts/install does it)."
        )
    return llama_cpp


llama_cpp = load_llama_cpp()

from llama_cpp._ctypes_extensions import ctypes_function_for_shared_library  # noqa: E402

_lib = llama_cpp.llama_cpp._lib
ctypes_function = ctypes_function_for_shared_library(_lib)


# LLAMA_API const char * llama_sparse_version(void);
@ctypes_function("llama_sparse_version", [], ctypes.c_char_p)
def llama_sparse_version() -> bytes: ...


# LLAMA_API bool llama_sparse_model_is_sparse(const struct llama_model * model);
@ctypes_function("llama_sparse_model_is_sparse", [llama_cpp.llama_model_p_ctypes], ctypes.c_bool)
def llama_sparse_model_is_sparse(model: llama_cpp.llama_model_p, /) -> bool: ...


# enum llama_sparse_mode
LLAMA_SPARSE_MODE_OFF = 0
LLAMA_SPARSE_MODE_THRESHOLD = 1
LLAMA_SPARSE_MODE_PREDICT = 2
LLAMA_SPARSE_MODE_AUTO = 3


class llama_sparse_params(ctypes.Structure):
    """struct llama_sparse_params"""

    _fields_ = [
        ("mode", ctypes.c_int),
        ("level", ctypes.c_float),
        ("alpha", ctypes.c_float),
    ]


# LLAMA_API const char * llama_sparse_mode_name(enum llama_sparse_mode mode);
@ctypes_function("llama_sparse_mode_name", [ctypes.c_int], ctypes.c_char_p)
def llama_sparse_mode_name(mode: int, /) -> bytes | None: ...


# LLAMA_API int32_t llama_sparse_mode_from_name(const char * name);
@ctypes_function("llama_sparse_mode_from_name", [ctypes.c_char_p], ctypes.c_int32)
def llama_sparse_mode_from_name(name: bytes, /) -> int: ...


# LLAMA_API struct llama_sparse_params llama_sparse_default_params(void);
@ctypes_function("llama_sparse_default_params", [], llama_sparse_params)
def llama_sparse_default_params() -> llama_sparse_params: ...


# LLAMA_API void llama_sparse_set_defaults(struct llama_sparse_params params);
@ctypes_function("llama_sparse_set_defaults", [llama_sparse_params], None)
def llama_sparse_set_defaults(params: llama_sparse_params, /) -> None: ...


# LLAMA_API int32_t llama_sparse_n_levels(const struct llama_model * model);
@ctypes_function("llama_sparse_n_levels", [llama_cpp.llama_model_p_ctypes], ctypes.c_int32)
def llama_sparse_n_levels(model: llama_cpp.llama_model_p, /) -> int: ...


# LLAMA_API float llama_sparse_level(const struct llama_model * model, int32_t i);
@ctypes_function(
    "llama_sparse_level", [llama_cpp.llama_model_p_ctypes, ctypes.c_int32], ctypes.c_float
)
def llama_sparse_level(model: llama_cpp.llama_model_p, i: int, /) -> float: ...


# LLAMA_API float llama_sparse_level_achieved(
#     const struct llama_model * model, enum llama_sparse_mode mode, int32_t i);
@ctypes_function(
    "llama_sparse_level_achieved",
    [llama_cpp.llama_model_p_ctypes, ctypes.c_int, ctypes.c_int32],
    ctypes.c_float,
)
def llama_sparse_level_achieved(model: llama_cpp.llama_model_p, mode: int, i: int, /) -> float: ...


# LLAMA_API int32_t llama_sparse_check(
#     const struct llama_model * model, struct llama_sparse_params params,
#     char * err, size_t err_size);
@ctypes_function(
    "llama_sparse_check",
    [llama_cpp.llama_model_p_ctypes, llama_sparse_params, ctypes.c_char_p, ctypes.c_size_t],
    ctypes.c_int32,
)
def llama_sparse_check(
    model: llama_cpp.llama_model_p,
    params: llama_sparse_params,
    err: ctypes.Array[ctypes.c_char],
    err_size: int,
    /,
) -> int: ...


# LLAMA_API int32_t llama_sparse_set(
#     struct llama_context * ctx, struct llama_sparse_params params, char * err, size_t err_size);
@ctypes_function(
    "llama_sparse_set",
    [llama_cpp.llama_context_p_ctypes, llama_sparse_params, ctypes.c_char_p, ctypes.c_size_t],
    ctypes.c_int32,
)
def llama_sparse_set(
    ctx: llama_cpp.llama_context_p,
    params: llama_sparse_params,
    err: ctypes.Array[ctypes.c_char],
    err_size: int,
    /,
) -> int: ...


# LLAMA_API struct llama_sparse_params llama_sparse_get(const struct llama_context * ctx);
@ctypes_function("llama_sparse_get", [llama_cpp.llama_context_p_ctypes], llama_sparse_params)
def llama_sparse_get(ctx: llama_cpp.llama_context_p, /) -> llama_sparse_params: ...


# LLAMA_API void llama_sparse_set_stats(struct llama_context * ctx, bool enable);
@ctypes_function("llama_sparse_set_stats", [llama_cpp.llama_context_p_ctypes, ctypes.c_bool], None)
def llama_sparse_set_stats(ctx: llama_cpp.llama_context_p, enable: bool, /) -> None: ...


# LLAMA_API void llama_sparse_stats_reset(struct llama_context * ctx);
@ctypes_function("llama_sparse_stats_reset", [llama_cpp.llama_context_p_ctypes], None)
def llama_sparse_stats_reset(ctx: llama_cpp.llama_context_p, /) -> None: ...


# LLAMA_API float llama_sparse_stats(
#     const struct llama_context * ctx, float * layer_sparsity, int32_t n_layer);
@ctypes_function(
    "llama_sparse_stats",
    [llama_cpp.llama_context_p_ctypes, ctypes.POINTER(ctypes.c_float), ctypes.c_int32],
    ctypes.c_float,
)
def llama_sparse_stats(
    ctx: llama_cpp.llama_context_p,
    layer_sparsity: ctypes.Array[ctypes.c_float] | None,
    n_layer: int,
    /,
) -> float: ...


# LLAMA_API double llama_sparse_stats_tokens(const struct llama_context * ctx);
@ctypes_function("llama_sparse_stats_tokens", [llama_cpp.llama_context_p_ctypes], ctypes.c_double)
def llama_sparse_stats_tokens(ctx: llama_cpp.llama_context_p, /) -> float: ...


# LLAMA_API int32_t llama_sparse_set_seq(
#     struct llama_context * ctx, llama_seq_id seq_id, const struct llama_sparse_params * params,
#     char * err, size_t err_size);
@ctypes_function(
    "llama_sparse_set_seq",
    [
        llama_cpp.llama_context_p_ctypes,
        ctypes.c_int32,
        ctypes.POINTER(llama_sparse_params),
        ctypes.c_char_p,
        ctypes.c_size_t,
    ],
    ctypes.c_int32,
)
def llama_sparse_set_seq(
    ctx: llama_cpp.llama_context_p,
    seq_id: int,
    params: ctypes._Pointer[llama_sparse_params] | None,
    err: ctypes.Array[ctypes.c_char] | None,
    err_size: int,
    /,
) -> int: ...


# LLAMA_API struct llama_sparse_params llama_sparse_get_seq(
#     const struct llama_context * ctx, llama_seq_id seq_id);
@ctypes_function(
    "llama_sparse_get_seq", [llama_cpp.llama_context_p_ctypes, ctypes.c_int32], llama_sparse_params
)
def llama_sparse_get_seq(ctx: llama_cpp.llama_context_p, seq_id: int, /) -> llama_sparse_params: ...


# LLAMA_API float llama_sparse_seq_stats(
#     const struct llama_context * ctx, llama_seq_id seq_id, double * n_tokens);
@ctypes_function(
    "llama_sparse_seq_stats",
    [llama_cpp.llama_context_p_ctypes, ctypes.c_int32, ctypes.POINTER(ctypes.c_double)],
    ctypes.c_float,
)
def llama_sparse_seq_stats(
    ctx: llama_cpp.llama_context_p,
    seq_id: int,
    n_tokens: ctypes._Pointer[ctypes.c_double] | None,
    /,
) -> float: ...


# LLAMA_API void llama_sparse_seq_stats_reset(struct llama_context * ctx, llama_seq_id seq_id);
@ctypes_function(
    "llama_sparse_seq_stats_reset", [llama_cpp.llama_context_p_ctypes, ctypes.c_int32], None
)
def llama_sparse_seq_stats_reset(ctx: llama_cpp.llama_context_p, seq_id: int, /) -> None: ...
