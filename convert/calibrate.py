"""Calibration: run a dense GGUF through llama-sparse and measure its FFN neurons.

The model runs on our own libllama (mode off, i.e. upstream numerics) through
llama-cpp-python's low-level API. A ggml eval callback (``cb_eval``) asks the
scheduler for three graph tensors per layer ``il``:

* ``ffn_norm-<il>``: the FFN input ``x`` (the normed hidden state), ``[T, n_embd]``;
* ``ffn_gate-<il>``: the gate pre-activations ``g``, ``[T, n_ff]``;
* ``ffn_up-<il>``: the up projections ``u``, ``[T, n_ff]``;

and copies them out with ``ggml_backend_tensor_get`` from our libggml-base.
All tokens of a batch are requested as outputs, so the last layer (which
upstream otherwise cuts to the output rows) sees every token too.

From these, over every calibration token, per layer and neuron ``i``:

* ``freq``: activation frequency, the fraction of tokens with ``g_i > 0``;
* ``up_absmean``: ``E|u_i|`` = ``E|up_i . x|`` (FORMAT.md ``ffn_up_absmean``);
* ``act_absmean``, ``h_absmean``, ``act_absmax``, ``h_absmax``: mean and max of
  ``|act(g_i)|`` and ``|h_i| = |act(g_i) u_i|``;
* ``agreement``: how often the SparseInfer sign predictor at ``alpha = 1``
  (skip iff ``n_pos < n_neg``, from the packed sign bits of ``x`` and of the
  dequantized gate row) agrees with the true gate sign (``g_i < 0``);
* per layer, histograms of ``n_neg`` (0..n_embd) split by true gate sign,
  which make the predictor's precision/recall exact for every ``alpha``;

plus a strided subsample of tokens (``n_samples``) whose ``g``, ``u`` and
``n_neg`` are kept, from which the weight-aware scores of mask points 2 and 3
(FORMAT.md "Mask points"), their distributions and the threshold allocation
(``allocate.py``) are computed. ``down_norm`` (norm of each neuron's output
vector, a column of the dense ``ffn_down``) and the gate sign rows come from
the weights, dequantized with the ``gguf`` package.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tqdm import tqdm

import llama_sparse  # noqa: F401  (sets LLAMA_CPP_LIB_PATH before llama_cpp loads)

from ._ggml import GGML_TYPE_F32, ggml_base
from .structure import SUPPORTED_ARCHS as ACTIVATIONS  # FFN activation per architecture

_WANTED = ("ffn_norm", "ffn_gate", "ffn_up")


def activate(g: np.ndarray, activation: str) -> np.ndarray:
    """The FFN activation as ggml computes it (GELU: tanh approximation)."""
    g = g.astype(np.float32, copy=False)
    if activation == "silu":
        return g / (1.0 + np.exp(-g))
    if activation == "gelu":
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * g * (1.0 + np.tanh(c * (g + 0.044715 * g * g * g)))
    if activation == "relu":
        return np.maximum(g, 0.0)
    if activation == "relu2":
        return np.square(np.maximum(g, 0.0))
    raise ValueError(f"unknown activation {activation!r}")


@dataclass
class LayerWeights:
    gate_sign: np.ndarray  # float32 [n_ff, n_embd], +1 where gate >= 0, -1 where < 0
    down_norm: np.ndarray  # float32 [n_ff]
    row_bytes: tuple[float, float, float]  # bytes of one neuron's gate, up, down row


@functools.lru_cache(maxsize=1)
def _load_ffn_weights(model_path: str, mtime_ns: int) -> tuple[str, int, list[LayerWeights]]:
    return _read_ffn_weights(model_path)


def load_ffn_weights(model_path: str | Path) -> tuple[str, int, list[LayerWeights]]:
    """Architecture, n_embd and the per-layer FFN weight data calibration needs
    (the last model's is cached: a held-out run after calibration reuses it)."""
    p = Path(model_path).resolve()
    return _load_ffn_weights(str(p), p.stat().st_mtime_ns)


def _read_ffn_weights(model_path: str | Path) -> tuple[str, int, list[LayerWeights]]:
    reader = GGUFReader(model_path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    tensors = {t.name: t for t in reader.tensors}
    layers: list[LayerWeights] = []
    n_embd = 0
    il = 0
    while f"blk.{il}.ffn_gate.weight" in tensors:
        gate_t = tensors[f"blk.{il}.ffn_gate.weight"]
        up_t = tensors[f"blk.{il}.ffn_up.weight"]
        down_t = tensors[f"blk.{il}.ffn_down.weight"]
        gate = dequantize(gate_t.data, gate_t.tensor_type).reshape(-1, int(gate_t.shape[0]))
        n_ff, n_embd = gate.shape
        down = dequantize(down_t.data, down_t.tensor_type).reshape(n_embd, n_ff)
        layers.append(
            LayerWeights(
                gate_sign=np.where(gate < 0, -1.0, 1.0).astype(np.float32),
                down_norm=np.linalg.norm(down.astype(np.float64), axis=0).astype(np.float32),
                row_bytes=(
                    int(gate_t.n_bytes) / n_ff,
                    int(up_t.n_bytes) / n_ff,
                    int(down_t.n_bytes) / n_ff,
                ),
            )
        )
        il += 1
    if not layers:
        raise ValueError(f"{model_path}: no blk.N.ffn_gate.weight tensors (no gated FFN)")
    return arch, n_embd, layers


@functools.lru_cache(maxsize=1)
def _reader(model_path: str, mtime_ns: int) -> GGUFReader:
    return GGUFReader(model_path)


def load_down(model_path: str | Path, il: int) -> np.ndarray:
    """Dense ``ffn_down`` of layer ``il`` as float32 ``[n_embd, n_ff]``."""
    p = Path(model_path).resolve()
    reader = _reader(str(p), p.stat().st_mtime_ns)
    t = next(t for t in reader.tensors if t.name == f"blk.{il}.ffn_down.weight")
    return dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))


@dataclass
class CalibrationStats:
    """Per-layer, per-neuron calibration statistics (lists indexed by layer)."""

    model_path: str
    arch: str
    activation: str
    n_embd: int
    n_ff: list[int]
    n_tokens: int  # calibration tokens fed (every one reaches every layer)
    source: str
    row_bytes: np.ndarray  # float [n_layer, 3]: bytes of a gate, up, down row
    freq: list[np.ndarray]  # P(g_i > 0)
    up_absmean: list[np.ndarray]  # E|u_i|
    act_absmean: list[np.ndarray]  # E|act(g_i)|
    h_absmean: list[np.ndarray]  # E|act(g_i) u_i|
    act_absmax: list[np.ndarray]
    h_absmax: list[np.ndarray]
    down_norm: list[np.ndarray]  # ||column i of ffn_down||
    agreement: list[np.ndarray]  # P(predicted negative at alpha=1 == (g_i < 0))
    nneg_hist_neg: np.ndarray  # int64 [n_layer, n_embd+1]: n_neg counts where g < 0
    nneg_hist_pos: np.ndarray  # int64 [n_layer, n_embd+1]: n_neg counts where g >= 0
    # strided token subsample, per layer
    sample_gate: list[np.ndarray] = field(repr=False)  # float16 [S, n_ff]
    sample_up: list[np.ndarray] = field(repr=False)  # float16 [S, n_ff]
    sample_nneg: list[np.ndarray] = field(repr=False)  # int16 [S, n_ff]
    seconds: float = 0.0

    @property
    def n_layer(self) -> int:
        return len(self.n_ff)

    @property
    def n_samples(self) -> int:
        return int(self.sample_gate[0].shape[0])

    def sample_act(self, il: int) -> np.ndarray:
        return activate(self.sample_gate[il], self.activation)

    def sample_h(self, il: int) -> np.ndarray:
        """``act(g) * u`` on the sample tokens, float32 ``[S, n_ff]``."""
        return self.sample_act(il) * self.sample_up[il].astype(np.float32)

    def score2(self, il: int) -> np.ndarray:
        """Mask point 2 score ``|act(g_i)| * ffn_up_absmean[i] * ffn_down_norm[i]``."""
        scale = self.up_absmean[il] * self.down_norm[il]
        return np.abs(self.sample_act(il)) * scale.astype(np.float32)

    def score3(self, il: int) -> np.ndarray:
        """Mask point 3 score ``|act(g_i) * u_i| * ffn_down_norm[i]``."""
        return np.abs(self.sample_h(il)) * self.down_norm[il]

    def nneg_ratio(self, il: int) -> np.ndarray:
        """``n_neg / n_pos`` of the sign predictor on the sample tokens (inf if n_pos=0)."""
        nneg = self.sample_nneg[il].astype(np.float64)
        with np.errstate(divide="ignore"):
            return nneg / (self.n_embd - nneg)

    def score_quantiles(self, il: int, point: int, q: np.ndarray) -> np.ndarray:
        """Quantiles ``q`` of the point-2 or point-3 score of layer ``il``."""
        s = self.score2(il) if point == 2 else self.score3(il)
        return np.quantile(s, q)

    def score3_max(self, il: int) -> np.ndarray:
        """Largest point-3 score ``max |act(g_i) u_i| * down_norm[i]`` over all
        calibration tokens: a neuron whose maximum stays below the dead
        tolerance never mattered (``sparse.dead_tolerance``)."""
        return self.h_absmax[il] * self.down_norm[il]

    def hot_order(self, il: int, keep: np.ndarray | None = None) -> np.ndarray:
        """Dense indices (of ``keep``, default all) ordered hot-first by
        activation frequency, ties by mean ``|h|``."""
        idx = np.arange(self.n_ff[il]) if keep is None else np.asarray(keep)
        order = np.lexsort((-self.h_absmean[il][idx], -self.freq[il][idx]))
        return idx[order]

    def layer_summary(self) -> list[dict[str, float]]:
        """Per-layer summary: activation frequency and predictor agreement."""
        out = []
        for il in range(self.n_layer):
            f = self.freq[il]
            out.append(
                {
                    "freq_mean": float(f.mean()),
                    "freq_min": float(f.min()),
                    "freq_max": float(f.max()),
                    "freq_lt_1pct": float((f < 0.01).mean()),
                    "agreement": float(self.agreement[il].mean()),
                }
            )
        return out


def _tensor_data(t: int) -> np.ndarray:
    """Data of a contiguous F32 graph tensor as a ``[nrows, ne0]`` array."""
    lib = ggml_base()
    if ctypes.c_int.from_address(t).value != GGML_TYPE_F32:
        raise RuntimeError(f"{lib.ggml_get_name(t)!r}: not F32")
    if not lib.ggml_is_contiguous(t):
        raise RuntimeError(f"{lib.ggml_get_name(t)!r}: not contiguous")
    n = int(lib.ggml_nelements(t))
    rows = int(lib.ggml_nrows(t))
    out = np.empty(n, dtype=np.float32)
    lib.ggml_backend_tensor_get(t, out.ctypes.data, 0, n * 4)
    return out.reshape(rows, n // rows)


def tokenize(vocab: object, text: str) -> list[int]:
    import llama_cpp

    data = text.encode("utf-8")
    n_max = len(data) + 16
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, False, False)
    if n < 0:
        raise RuntimeError("tokenization failed")
    return list(buf[:n])


def tokenize_with_model(model_path: str | Path, text: str) -> list[int]:
    """Tokens of ``text`` (no special tokens added) with the model's vocabulary."""
    import llama_cpp

    _silence_llama()
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
    if not model:
        raise RuntimeError(f"{model_path}: cannot load model")
    try:
        return tokenize(llama_cpp.llama_model_get_vocab(model), text)
    finally:
        llama_cpp.llama_model_free(model)


_quiet_log = None


def _silence_llama() -> None:
    global _quiet_log
    import llama_cpp

    if _quiet_log is None:
        _quiet_log = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))


def calibrate(
    model_path: str | Path,
    text: str | None = None,
    n_tokens: int = 16384,
    *,
    batch: int = 512,
    n_threads: int | None = None,
    n_samples: int = 1024,
    source: str = "",
    progress: bool = True,
    verbose: bool = False,
) -> CalibrationStats:
    """Run ``model_path`` on ``n_tokens`` tokens of ``text`` and gather FFN statistics.

    The first ``n_tokens`` tokens of the text are cut into independent
    sequences of ``batch`` tokens (after a BOS when the model wants one; the
    BOS rows are not counted), each decoded in one batch. ``text``
    defaults to ``text.calibration_text()``. ``n_samples`` tokens, evenly
    strided over the run, are kept whole for scores and allocation.
    """
    import llama_cpp

    if text is None:
        from .text import calibration_text

        text, source = calibration_text()
    model_path = str(model_path)
    arch, n_embd, weights = load_ffn_weights(model_path)
    if arch not in ACTIVATIONS:
        raise ValueError(f"{model_path}: architecture {arch!r} not supported")
    activation = ACTIVATIONS[arch]
    n_layer = len(weights)
    n_ff = [int(w.gate_sign.shape[0]) for w in weights]

    if not verbose:
        _silence_llama()
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), mparams)
    if not model:
        raise RuntimeError(f"{model_path}: cannot load model")
    ctx = None
    batch_obj = None
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        bos = int(llama_cpp.llama_vocab_bos(vocab))
        tokens = tokenize(vocab, text)
        skip = 1 if add_bos else 0  # the BOS row of each sequence is not counted
        per_seq = batch - skip
        n_tokens = min(n_tokens, len(tokens))
        if n_tokens <= 0:
            raise ValueError("no calibration tokens")
        chunks = [tokens[i : min(i + per_seq, n_tokens)] for i in range(0, n_tokens, per_seq)]
        seq_len = max(len(c) for c in chunks) + skip
        stride = max(1, n_tokens // n_samples)

        captured: dict[tuple[str, int], np.ndarray] = {}

        def want(name: bytes) -> tuple[str, int] | None:
            base, _, il = name.decode(errors="replace").rpartition("-")
            if base in _WANTED and il.isdigit():
                return base, int(il)
            return None

        @llama_cpp.ggml_backend_sched_eval_callback
        def cb_eval(t: int, ask: bool, user_data: int) -> bool:
            key = want(ggml_base().ggml_get_name(t))
            if key is None:
                return False
            if ask:
                return True
            captured[key] = _tensor_data(t)
            return True

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = seq_len
        cparams.n_batch = seq_len
        cparams.n_ubatch = seq_len
        cparams.n_seq_max = 1
        threads = n_threads or os.cpu_count() or 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.cb_eval = cb_eval
        cparams.cb_eval_user_data = None
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError("cannot create a llama context")
        mem = llama_cpp.llama_get_memory(ctx)
        batch_obj = llama_cpp.llama_batch_init(seq_len, 0, 1)

        f64 = [np.zeros(n, dtype=np.float64) for n in n_ff]
        acc = {k: [a.copy() for a in f64] for k in ("freq", "up", "act", "h", "agree")}
        amax = [np.zeros(n, dtype=np.float32) for n in n_ff]
        hmax = [np.zeros(n, dtype=np.float32) for n in n_ff]
        hist_neg = np.zeros((n_layer, n_embd + 1), dtype=np.int64)
        hist_pos = np.zeros((n_layer, n_embd + 1), dtype=np.int64)
        s_gate: list[list[np.ndarray]] = [[] for _ in range(n_layer)]
        s_up: list[list[np.ndarray]] = [[] for _ in range(n_layer)]
        s_nneg: list[list[np.ndarray]] = [[] for _ in range(n_layer)]

        t0 = time.perf_counter()
        bar = tqdm(
            total=n_tokens,
            unit="tok",
            desc="calibrate",
            disable=not progress,
            file=sys.stderr,
        )
        row0 = 0
        for chunk in chunks:
            seq = [bos] + chunk if add_bos else chunk
            llama_cpp.llama_memory_clear(mem, True)
            batch_obj.n_tokens = len(seq)
            for i, tok in enumerate(seq):
                batch_obj.token[i] = tok
                batch_obj.pos[i] = i
                batch_obj.n_seq_id[i] = 1
                batch_obj.seq_id[i][0] = 0
                batch_obj.logits[i] = True
            captured.clear()
            rc = llama_cpp.llama_decode(ctx, batch_obj)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed: {rc}")
            rows = np.arange(row0, row0 + len(chunk))
            pick = np.nonzero(rows % stride == 0)[0]
            row0 += len(chunk)
            for il in range(n_layer):
                try:
                    x = captured[("ffn_norm", il)]
                    g = captured[("ffn_gate", il)]
                    u = captured[("ffn_up", il)]
                except KeyError as e:
                    raise RuntimeError(f"graph tensor {e.args[0]} not seen") from None
                if x.shape != (len(seq), n_embd) or g.shape != (len(seq), n_ff[il]):
                    raise RuntimeError(f"layer {il}: unexpected shapes {x.shape} {g.shape}")
                x, g, u = x[skip:], g[skip:], u[skip:]
                a = activate(g, activation)
                h = a * u
                acc["freq"][il] += (g > 0).sum(axis=0)
                acc["up"][il] += np.abs(u).sum(axis=0)
                acc["act"][il] += np.abs(a).sum(axis=0)
                acc["h"][il] += np.abs(h).sum(axis=0)
                np.maximum(amax[il], np.abs(a).max(axis=0), out=amax[il])
                np.maximum(hmax[il], np.abs(h).max(axis=0), out=hmax[il])
                sx = np.where(x < 0, -1.0, 1.0).astype(np.float32)
                dot = sx @ weights[il].gate_sign.T  # n_pos - n_neg, exact in f32
                nneg = np.rint((n_embd - dot) * 0.5).astype(np.int32)
                neg = g < 0
                acc["agree"][il] += ((2 * nneg > n_embd) == neg).sum(axis=0)
                hist_neg[il] += np.bincount(nneg[neg], minlength=n_embd + 1)
                hist_pos[il] += np.bincount(nneg[~neg], minlength=n_embd + 1)
                if pick.size:
                    s_gate[il].append(g[pick].astype(np.float16))
                    s_up[il].append(u[pick].astype(np.float16))
                    s_nneg[il].append(nneg[pick].astype(np.int16))
            bar.update(len(chunk))
        bar.close()
        seconds = time.perf_counter() - t0
    finally:
        if batch_obj is not None:
            llama_cpp.llama_batch_free(batch_obj)
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)

    if progress:
        print(
            f"calibrate: {n_tokens} tokens in {len(chunks)} sequences in {seconds:.1f} s, "
            f"{n_tokens / seconds:.0f} tokens/s, {threads} threads",
            file=sys.stderr,
        )
    n = float(n_tokens)
    return CalibrationStats(
        model_path=model_path,
        arch=arch,
        activation=activation,
        n_embd=n_embd,
        n_ff=n_ff,
        n_tokens=n_tokens,
        source=source,
        row_bytes=np.array([w.row_bytes for w in weights], dtype=np.float64),
        freq=[(v / n).astype(np.float32) for v in acc["freq"]],
        up_absmean=[(v / n).astype(np.float32) for v in acc["up"]],
        act_absmean=[(v / n).astype(np.float32) for v in acc["act"]],
        h_absmean=[(v / n).astype(np.float32) for v in acc["h"]],
        act_absmax=amax,
        h_absmax=hmax,
        down_norm=[w.down_norm for w in weights],
        agreement=[(v / n).astype(np.float32) for v in acc["agree"]],
        nneg_hist_neg=hist_neg,
        nneg_hist_pos=hist_pos,
        sample_gate=[np.concatenate(v) for v in s_gate],
        sample_up=[np.concatenate(v) for v in s_up],
        sample_nneg=[np.concatenate(v) for v in s_nneg],
        seconds=seconds,
    )
