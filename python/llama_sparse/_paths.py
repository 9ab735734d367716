"""Where llama_sparse keeps its libraries, tools and downloads."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


class NotBuiltError(ImportError):
    """The package is imported from a source tree that was never built."""


def lib_dir() -> Path:
    """Directory holding our libllama / libggml shared libraries."""
    return PACKAGE_DIR / "lib"


def bin_dir() -> Path:
    """Directory holding our llama.cpp tools (llama-server, llama-bench, ...)."""
    return PACKAGE_DIR / "bin"


def tool(name: str) -> Path:
    """Path of a bundled tool; NotBuiltError when the package was not built."""
    path = bin_dir() / name
    if not path.is_file():
        raise NotBuiltError(
            f"{path} does not exist: llama_sparse is imported from a source tree that was "
            "not built. Install it with `pip install .` (see README.md)."
        )
    return path


def cache_dir() -> Path:
    """Download cache: $LLAMA_SPARSE_CACHE, else $XDG_CACHE_HOME/llama-sparse, else ~/.cache.

    vendor/fetch.py uses the same rule for the upstream source distribution.
    """
    env = os.environ.get("LLAMA_SPARSE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llama-sparse"
