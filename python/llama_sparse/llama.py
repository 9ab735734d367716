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


class SparsityError(ValueError):
    """Sparsity settings the model cannot use: a dense model, a level not in
    its table or beyond what the mode reaches, an unknown mode, an alpha <= 0."""


SPARSE_MODES = ("off", "threshold", "predict", "auto")


class Llama(llama_cpp.Llama):
    """llama-cpp-python's `Llama` on the llama-sparse library.

    Takes every argument llama_cpp.Llama takes, plus the sparsity settings
    (see `set_sparsity`): `sparse_mode`, `sparsity` (a level of the sparse
    GGUF's table, or 0) and `sparse_alpha`. A model file that is missing, not
    GGUF or damaged raises `ModelFileError` (a ValueError) saying which;
    sparsity settings the model cannot use raise `SparsityError`.
    """

    def __init__(
        self,
        model_path: str,
        *args: Any,
        sparse_mode: str | None = None,
        sparsity: float | None = None,
        sparse_alpha: float | None = None,
        **kwargs: Any,
    ) -> None:
        check_model_file(model_path)
        with _capture_errors() as errors:
            try:
                super().__init__(model_path, *args, **kwargs)
            except ValueError as e:
                if not str(e).startswith("Failed to load model"):
                    raise
                reason = _load_failure_reason(errors) or "llama.cpp could not load it"
                raise ModelFileError(f"cannot load {model_path}: {reason}") from None
        if sparse_mode is not None or sparsity is not None or sparse_alpha is not None:
            self.set_sparsity(mode=sparse_mode, level=sparsity, alpha=sparse_alpha)

    def set_sparsity(
        self, mode: str | None = None, level: float | None = None, alpha: float | None = None
    ) -> None:
        """Change the sparsity settings; they apply from the next evaluation.

        mode: "off" (dense, as upstream), "threshold", "predict" or "auto"
        (the model's default mode, off at level 0). Unchanged when None, except
        that setting a level while the mode is off switches to "auto".
        level: fraction of FFN weight bytes skipped per token, 0 or one of
        `sparse_levels`. alpha: factor on the predictor's calibrated alpha
        (larger skips less). Raises SparsityError, changing nothing, when the
        model cannot use the settings.
        """
        cur = _binding.llama_sparse_get(self._ctx.ctx)
        p = _binding.llama_sparse_params(cur.mode, cur.level, cur.alpha)
        if mode is not None:
            if mode not in SPARSE_MODES:
                raise SparsityError(
                    f"unknown sparse mode {mode!r} (one of {', '.join(SPARSE_MODES)})"
                )
            p.mode = _binding.llama_sparse_mode_from_name(mode.encode())
        elif level is not None and cur.mode == _binding.LLAMA_SPARSE_MODE_OFF:
            p.mode = _binding.LLAMA_SPARSE_MODE_AUTO
        if level is not None:
            p.level = float(level)
        if alpha is not None:
            p.alpha = float(alpha)
        err = ctypes.create_string_buffer(512)
        if _binding.llama_sparse_set(self._ctx.ctx, p, err, len(err)) != 0:
            raise SparsityError(err.value.decode())
        # statistics cost a few small ops per layer: only collected while sparse
        _binding.llama_sparse_set_stats(self._ctx.ctx, self.sparse_mode != "off")

    @property
    def sparse_mode(self) -> str:
        """The current sparse mode ("auto" resolved)."""
        mode = _binding.llama_sparse_get(self._ctx.ctx).mode
        return (_binding.llama_sparse_mode_name(mode) or b"?").decode()

    @property
    def sparsity(self) -> float:
        """The current sparsity level."""
        return float(_binding.llama_sparse_get(self._ctx.ctx).level)

    @property
    def sparse_levels(self) -> list[float]:
        """The levels of the model's threshold table (empty for a dense model)."""
        m = self._model.model
        return [
            round(float(_binding.llama_sparse_level(m, i)), 4)
            for i in range(_binding.llama_sparse_n_levels(m))
        ]

    def sparse_stats(self, reset: bool = False) -> dict[str, Any]:
        """Sparsity achieved since the last reset: the fraction of FFN weight
        bytes skipped per token, overall (`sparsity`) and per layer (`layers`),
        over `tokens` evaluated tokens. None/empty while nothing was counted
        (mode off, or no evaluation yet)."""
        n_layer = llama_cpp.llama_model_n_layer(self._model.model)
        layers = (ctypes.c_float * n_layer)()
        overall = _binding.llama_sparse_stats(self._ctx.ctx, layers, n_layer)
        tokens = _binding.llama_sparse_stats_tokens(self._ctx.ctx)
        if reset:
            _binding.llama_sparse_stats_reset(self._ctx.ctx)
        counted = overall >= 0
        return {
            "mode": self.sparse_mode,
            "level": self.sparsity,
            "sparsity": float(overall) if counted else None,
            "layers": [float(v) for v in layers] if counted else [],
            "tokens": int(tokens),
        }

    def close(self) -> None:
        if hasattr(self, "_stack"):  # __init__ failed before llama-cpp-python set anything up
            super().close()

    @property
    def is_sparse(self) -> bool:
        """Whether the model is a sparse GGUF written by the llama-sparse converter."""
        return bool(_binding.llama_sparse_model_is_sparse(self._model.model))
