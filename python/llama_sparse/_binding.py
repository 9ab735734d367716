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
