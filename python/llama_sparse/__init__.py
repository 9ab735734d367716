"""llama-sparse: llama.cpp with training-free activation sparsity.

`from llama_sparse import Llama` gives llama-cpp-python's Llama running on the
llama-sparse library. Import llama_sparse before llama_cpp: importing it
points llama_cpp at our libllama.
"""

from __future__ import annotations

import os
from importlib.metadata import version
from typing import TYPE_CHECKING

from ._paths import bin_dir, lib_dir

if TYPE_CHECKING:
    from .llama import Llama, ModelFileError, SparsityError

__version__ = version("llama-sparse")
__all__ = ["Llama", "ModelFileError", "SparsityError", "bin_dir", "lib_dir", "__version__"]

# Cheap and eager, so that a later `import llama_cpp` loads our library even
# before Llama is touched; the checks happen when llama_cpp is actually loaded.
if (lib_dir() / "libllama.so").exists():
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir())
    os.environ["MTMD_CPP_LIB"] = str(lib_dir())


def __getattr__(name: str) -> object:
    # Llama is imported on first use: the command line's launchers and model
    # downloads do not need llama-cpp-python.
    if name in ("Llama", "ModelFileError", "SparsityError"):
        from . import llama

        return getattr(llama, name)
    raise AttributeError(f"module 'llama_sparse' has no attribute {name!r}")
