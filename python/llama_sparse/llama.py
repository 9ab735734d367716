"""`llama_sparse.Llama`: llama-cpp-python's Llama, running on the llama-sparse library."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import _binding
from ._binding import llama_cpp

GGUF_MAGIC = b"GGUF"
# enum ggml_log_level in ggml.h (llama-cpp-python's _logger.py has an older numbering)
_GGML_LOG_LEVEL_ERROR = 4
_GGML_LOG_LEVEL_CONT = 5


class ModelFileError(ValueError):
    """The model file is missing, not a GGUF file, or damaged.

    A ValueError, like llama-cpp-python's own load failure, so code written
    for llama-cpp-python keeps catching it.
    """


# llama.cpp reports why a load failed only through its log. While a model
# loads, error lines are collected (and still passed on to llama-cpp-python's
# logger, which prints them or not as `verbose` says).
_captured: list[str] | None = None
_upstream_log = llama_cpp._logger.llama_log_callback
_last_level = 0


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    global _last_level
    if level != _GGML_LOG_LEVEL_CONT:
        _last_level = level
    if _captured is not None and _last_level == _GGML_LOG_LEVEL_ERROR:
        _captured.append(text.decode("utf-8", errors="replace"))
    _upstream_log(level, text, user_data)


llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def _capture_errors() -> Iterator[list[str]]:
    global _captured
    _captured = lines = []
    try:
        yield lines
    finally:
        _captured = None


def check_model_file(path: str | os.PathLike[str]) -> Path:
    """Raise ModelFileError unless `path` is an existing file that starts like a GGUF."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelFileError(f"model path is not a file: {p}")
    with p.open("rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ModelFileError(
            f"{p} is not a GGUF file (it starts with {head!r}, a GGUF file with {GGUF_MAGIC!r})"
        )
    return p


def _load_failure_reason(lines: list[str]) -> str:
    """The most specific thing llama.cpp logged about a failed load."""
    text = [line.strip() for line in "".join(lines).splitlines() if line.strip()]
    for line in text:
        if line.startswith("gguf_"):  # the GGUF parser's own complaint
            return f"{line.split(': ', 1)[-1]} (the GGUF file is truncated or damaged)"
    for line in text:
        if "error loading model:" in line:
            return line.split("error loading model:", 1)[1].strip()
    return text[-1] if text else ""


class Llama(llama_cpp.Llama):
    """llama-cpp-python's `Llama` on the llama-sparse library.

    Takes every argument llama_cpp.Llama takes. A model file that is missing,
    not GGUF or damaged raises `ModelFileError` (a ValueError) saying which.
    """

    def __init__(self, model_path: str, *args: Any, **kwargs: Any) -> None:
        check_model_file(model_path)
        with _capture_errors() as errors:
            try:
                super().__init__(model_path, *args, **kwargs)
            except ValueError as e:
                if not str(e).startswith("Failed to load model"):
                    raise
                reason = _load_failure_reason(errors) or "llama.cpp could not load it"
                raise ModelFileError(f"cannot load {model_path}: {reason}") from None

    def close(self) -> None:
        if hasattr(self, "_stack"):  # __init__ failed before llama-cpp-python set anything up
            super().close()

    @property
    def is_sparse(self) -> bool:
        """Whether the model is a sparse GGUF written by the llama-sparse converter."""
        return bool(_binding.llama_sparse_model_is_sparse(self._model.model))
