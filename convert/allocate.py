"""Threshold tables: predictor alpha and per-layer thresholds per sparsity level.

Everything here works on a ``CalibrationStats`` (``calibrate.py``): the
sign-predictor histograms (exact over all calibration tokens) and the token
subsample (``sample_gate``, ``sample_up``, ``sample_nneg``), from which the
three mask-point scores of docs/FORMAT.md are recomputed exactly as the
runtime computes them.

**Level.** A level is the fraction of FFN weight bytes skipped per token:
a neuron skipped at point 1 saves its gate, up and down rows, at point 2 its
up and down rows, at point 3 its down row; each row counts its bytes in the
model's types (``CalibrationStats.row_bytes``). Mode ``threshold`` always
reads every gate row, so it cannot go beyond ``(up + down) / (gate + up +
down)`` of the bytes (2/3 when the three types are equal); levels above what
a mode can reach get that mode's sparsest table entry, and
``Tables.achieved_*`` says what each entry really achieves.

**Error.** Skipping neuron ``i`` for a token removes ``h_i d_i`` from the
FFN output (``h_i = act(g_i) u_i``, ``d_i`` its down vector). The error of a
layer is the removed contribution energy relative to the total,
``sum_skipped (h_i |d_i|)^2 / sum_all (h_i |d_i|)^2 = sum s3^2 / sum s3^2``
over the sample tokens: the relative squared L2 error of the FFN output when
the down vectors are treated as orthogonal (cross terms average out over
tokens). The model-level error is the mean over layers.

**Allocation.** For each layer and point, the candidate thresholds are a grid
of quantiles of that point's score on the sample (point 1: values of
``alpha`` from "skips almost nothing" down to the calibrated
``predictor_alpha``, never more aggressive than the target precision). A 3-D
histogram of (bin1, bin2, bin3) per neuron-token with suffix sums gives the
bytes and the error of every threshold combination of a layer at once.

* ``uniform``: every layer skips the same fraction of its bytes, points 2
  and 3 at the same quantile index (predict mode: alpha fixed at the
  calibrated ``predictor_alpha``);
* ``greedy`` (after TEAL's greedy search): start dense, repeatedly take the
  step (one layer, one point, next grid threshold) that skips bytes at the
  least added error per byte, and record the thresholds when the level is
  reached. It has the least error as defined above, but not the least KL
  divergence of the model's output: it piles the level onto the few layers
  where one neuron dominates (SmolLM2 at level 0.1: 73 % and 61 % in two
  layers, 4-7 % in most), and a layer's relative error does not say how much
  the model's output depends on that layer. ``uniform`` is the default: its
  mean KL over both real models at levels 0.1-0.6 is the lowest, though
  greedy's is lower on Gemma-3 from 0.3 on (scripts/bench_allocation.py);
* ``cats`` (the baseline of CATS): point 2 only, on the plain score
  ``|act(g)|`` (no weight-aware scales), every layer skipping the same
  fraction of its bytes (predict mode: alpha fixed at the calibrated
  ``predictor_alpha`` as in ``uniform``). The converter makes point 2's score
  plain by storing ``ffn_up_absmean = 1 / ffn_down_norm`` (docs/FORMAT.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .calibrate import CalibrationStats

DEFAULT_LEVELS = tuple(round(0.1 * i, 1) for i in range(1, 10))
DEFAULT_PRECISION = 0.99
ALLOCATIONS = ("greedy", "uniform", "cats")
# the allocation with the lowest mean KL against the dense model over both real models
# and levels (scripts/bench_allocation.py, docs/BENCHMARKS.md)
DEFAULT_ALLOCATION = "uniform"


# -- predictor ---------------------------------------------------------------


def predict_skip(nneg: np.ndarray, n_embd: int, alpha: float) -> np.ndarray:
    """Mask point 1 as the runtime applies it: skip iff ``alpha * n_pos < n_neg``."""
    if alpha <= 0:
        return np.zeros(np.shape(nneg), dtype=bool)
    nneg = np.asarray(nneg, dtype=np.float32)
    return np.float32(alpha) * (np.float32(n_embd) - nneg) < nneg


def _alpha_between(m: int, n_embd: int) -> float:
    """An alpha that skips exactly the tokens with ``n_neg >= m`` (1 <= m <= n_embd)."""
    hi = m / (n_embd - m) if m < n_embd else 2.0 * n_embd
    lo = (m - 1) / (n_embd - m + 1)
    return float(np.sqrt(lo * hi)) if lo > 0 else hi / 2.0


def predictor_precision(stats: CalibrationStats, il: int, alpha: float) -> tuple[float, float]:
    """Precision (P(g < 0 | skipped)) and skip rate of the predictor on all calibration tokens."""
    n = np.arange(stats.n_embd + 1)
    skip = predict_skip(n, stats.n_embd, alpha)
    neg = stats.nneg_hist_neg[il]
    pos = stats.nneg_hist_pos[il]
    skipped = int(neg[skip].sum() + pos[skip].sum())
    total = int(neg.sum() + pos.sum())
    prec = float(neg[skip].sum() / skipped) if skipped else 1.0
    return prec, skipped / total


def calibrate_alpha(stats: CalibrationStats, precision: float = DEFAULT_PRECISION) -> np.ndarray:
    """Per-layer alpha: the most aggressive one whose predicted-negative neurons
    are truly negative (``g < 0``) with at least ``precision``, on all
    calibration tokens. 0 (predictor off) for a layer where no alpha reaches it.
    """
    out = np.zeros(stats.n_layer, dtype=np.float32)
    for il in range(stats.n_layer):
        neg = stats.nneg_hist_neg[il][::-1].cumsum()[::-1]  # tokens with n_neg >= m
        tot = neg + stats.nneg_hist_pos[il][::-1].cumsum()[::-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            prec = np.where(tot > 0, neg / np.maximum(tot, 1), 1.0)
        ok = np.nonzero((prec >= precision) & (tot > 0))[0]
        ok = ok[ok >= 1]
        if ok.size:
            out[il] = _alpha_between(int(ok[0]), stats.n_embd)
    return out


# -- per-layer grids ---------------------------------------------------------


@dataclass
class _LayerGrid:
    alphas: np.ndarray  # [K1], alphas[0] = 0 (off), then decreasing
    t2: np.ndarray  # [K2], t2[0] = 0, increasing
    t3: np.ndarray  # [K3], t3[0] = 0, increasing
    frac: np.ndarray  # [K1, K2, K3] fraction of the layer's bytes skipped
    err: np.ndarray  # [K1, K2, K3] relative error
    total_bytes: float  # bytes of the layer's FFN rows per token


def _keep(stats: CalibrationStats, il: int, keep: list[np.ndarray] | None) -> np.ndarray:
    if keep is None:
        return np.arange(stats.n_ff[il])
    k = np.asarray(keep[il])
    return np.nonzero(k)[0] if k.dtype == bool else k


def _scores(
    stats: CalibrationStats,
    il: int,
    cols: np.ndarray,
    ref: CalibrationStats | None = None,
    plain_gate: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_neg, s2, s3) on ``stats``' sample tokens, kept neurons only.

    The per-neuron scales (``up_absmean``, ``down_norm``) come from ``ref``
    (the calibration run that writes them into the GGUF), default ``stats``.
    ``plain_gate``: s2 is plain ``|act(g)|`` (allocation ``cats``).
    """
    ref = ref or stats
    a = stats.sample_act(il)[:, cols]
    u = stats.sample_up[il][:, cols].astype(np.float32)
    dn = ref.down_norm[il][cols]
    s2 = np.abs(a) if plain_gate else np.abs(a) * (ref.up_absmean[il][cols] * dn)
    s3 = np.abs(a * u) * dn
    return stats.sample_nneg[il][:, cols], s2, s3


def _quantile_grid(s: np.ndarray, k: int, qmax: float, rng: np.random.Generator) -> np.ndarray:
    flat = s.ravel()
    if flat.size > 262144:
        flat = rng.choice(flat, 262144, replace=False)
    q = np.linspace(0.0, qmax, k)
    t = np.quantile(flat, q).astype(np.float32)
    t[0] = 0.0
    return np.maximum.accumulate(t)


def _suffix(x: np.ndarray) -> np.ndarray:
    return x[::-1, ::-1, ::-1].cumsum(0).cumsum(1).cumsum(2)[::-1, ::-1, ::-1]


def _grid_from_bins(
    stats: CalibrationStats,
    il: int,
    n_cols: int,
    alphas: np.ndarray,
    t2: np.ndarray,
    t3: np.ndarray,
    b1: np.ndarray,
    b2: np.ndarray,
    b3: np.ndarray,
    e: np.ndarray,
) -> _LayerGrid:
    K1, K2, K3 = len(alphas), len(t2), len(t3)
    idx = (b1 * K2 + b2) * K3 + b3
    c = np.bincount(idx, minlength=K1 * K2 * K3).reshape(K1, K2, K3).astype(np.float64)
    w = np.bincount(idx, weights=e, minlength=K1 * K2 * K3).reshape(K1, K2, K3)
    sc, sw = _suffix(c), _suffix(w)
    bg, bu, bd = stats.row_bytes[il]
    n = float(c.sum())
    comp = sc[:, :1, :1]  # computed at all (not skipped at point 1)
    up = sc[:, :, :1]  # up computed
    down = sc  # down read
    skipped = (n - comp) * (bg + bu + bd) + (comp - up) * (bu + bd) + (up - down) * bd
    wtot = float(w.sum()) or 1.0
    return _LayerGrid(
        alphas=alphas,
        t2=t2,
        t3=t3,
        frac=skipped / (n * (bg + bu + bd)),
        err=(wtot - sw) / wtot,
        total_bytes=n_cols * (bg + bu + bd),
    )


def _layer_grids(
    stats: CalibrationStats,
    il: int,
    cols: np.ndarray,
    alpha_min: float,
    grid: int,
    grid_predict: tuple[int, int],
    rng: np.random.Generator,
    plain_gate: bool = False,
) -> tuple[_LayerGrid, _LayerGrid]:
    """The layer's grids for mode threshold and mode predict.

    Mode predict's point-2/3 grids are every ``stride``-th entry of mode
    threshold's, so one binning serves both (bin // stride).
    """
    nneg, s2, s3 = _scores(stats, il, cols, plain_gate=plain_gate)
    nneg, s2, s3 = nneg.ravel(), s2.ravel(), s3.ravel()
    n_embd = stats.n_embd
    k1, k23 = grid_predict
    stride = max(1, (grid - 1) // max(k23 - 1, 1))
    k_thr = stride * (k23 - 1) + 1
    qmax = 0.998
    t2 = _quantile_grid(s2, k_thr, qmax, rng)
    t3 = _quantile_grid(s3, k_thr, qmax, rng)
    b2 = np.searchsorted(t2[1:], s2, side="right")
    b3 = np.searchsorted(t3[1:], s3, side="right")
    e = s3.astype(np.float64) ** 2
    zero = np.zeros(1, dtype=np.float32)
    g_thr = _grid_from_bins(stats, il, len(cols), zero, t2, t3, np.zeros_like(b2), b2, b3, e)
    if k1 > 1 and alpha_min > 0:
        ratio = nneg.astype(np.float64) / np.maximum(n_embd - nneg.astype(np.float64), 1)
        alpha_hi = max(float(np.quantile(ratio, 0.999)), alpha_min)
        alphas = np.concatenate([[0.0], np.geomspace(alpha_hi, alpha_min, k1 - 1)])
    else:
        alphas = np.zeros(1)
    alphas = alphas.astype(np.float32)
    # a neuron-token is skipped at grid index k iff its bin < k
    b1 = np.zeros(nneg.shape, dtype=np.int64)
    for a in alphas[1:]:
        b1 += ~predict_skip(nneg, n_embd, float(a))
    g_pre = _grid_from_bins(
        stats,
        il,
        len(cols),
        alphas,
        t2[::stride],
        t3[::stride],
        b1,
        b2 // stride,
        b3 // stride,
        e,
    )
    return g_thr, g_pre


# -- tables ------------------------------------------------------------------


@dataclass
class ModeTable:
    """One mode's table: per level and layer, the threshold of each point."""

    alpha: np.ndarray  # [L, n_layer] point 1 (0: off)
    gate: np.ndarray  # [L, n_layer] point 2
    up: np.ndarray  # [L, n_layer] point 3
    achieved: np.ndarray  # [L] byte sparsity on the calibration sample
    error: np.ndarray  # [L] mean relative error over layers on the calibration sample
    layer_frac: np.ndarray = field(repr=False)  # [L, n_layer]
    layer_err: np.ndarray = field(repr=False)  # [L, n_layer]


@dataclass
class Tables:
    levels: np.ndarray  # [L]
    allocation: str  # "greedy", "uniform" or "cats"
    predictor_alpha: np.ndarray  # [n_layer]
    threshold: ModeTable  # mode threshold (points 2 and 3)
    predict: ModeTable  # mode predict (points 1, 2 and 3)

    def reachable(self, mode: str, tol: float = 0.01) -> np.ndarray:
        """Per level: does mode ``threshold``/``predict`` reach it on the calibration sample?"""
        t = self.threshold if mode == "threshold" else self.predict
        return t.achieved >= self.levels - tol

    @property
    def plain_gate(self) -> bool:
        """Point 2 scores plain ``|act(g)|`` (``ffn_up_absmean`` is ``1 / ffn_down_norm``)."""
        return self.allocation == "cats"

    def metadata(self) -> dict[str, Any]:
        """The ``sparse.*`` table keys of docs/FORMAT.md (arrays level-major)."""

        def flat(a: np.ndarray) -> list[float]:
            return [float(v) for v in np.asarray(a, dtype=np.float32).ravel()]

        return {
            "sparse.predictor.alpha": flat(self.predictor_alpha),
            "sparse.levels": flat(self.levels),
            "sparse.allocation": self.allocation,
            "sparse.threshold.gate": flat(self.threshold.gate),
            "sparse.threshold.up": flat(self.threshold.up),
            "sparse.predict.alpha": flat(self.predict.alpha),
            "sparse.predict.gate": flat(self.predict.gate),
            "sparse.predict.up": flat(self.predict.up),
        }


def _mode_table(grids: list[_LayerGrid], states: np.ndarray) -> ModeTable:
    """``states``: int [L, n_layer, 3] grid indices."""
    L, n_layer, _ = states.shape
    alpha = np.zeros((L, n_layer), dtype=np.float32)
    gate = np.zeros((L, n_layer), dtype=np.float32)
    up = np.zeros((L, n_layer), dtype=np.float32)
    frac = np.zeros((L, n_layer))
    err = np.zeros((L, n_layer))
    for lv in range(L):
        for il, g in enumerate(grids):
            k1, k2, k3 = states[lv, il]
            alpha[lv, il] = g.alphas[k1]
            gate[lv, il] = g.t2[k2]
            up[lv, il] = g.t3[k3]
            frac[lv, il] = g.frac[k1, k2, k3]
            err[lv, il] = g.err[k1, k2, k3]
    tb = np.array([g.total_bytes for g in grids])
    return ModeTable(
        alpha=alpha,
        gate=gate,
        up=up,
        achieved=(frac * tb).sum(axis=1) / tb.sum(),
        error=err.mean(axis=1),
        layer_frac=frac,
        layer_err=err,
    )


def _uniform(
    grids: list[_LayerGrid], levels: np.ndarray, predict: bool, up: bool = True
) -> np.ndarray:
    """Every layer skips the same fraction of its bytes: points 2 and 3 at the same
    quantile index (``up``) or point 2 alone; predict mode adds the calibrated alpha."""
    states = np.zeros((len(levels), len(grids), 3), dtype=np.int64)
    for il, g in enumerate(grids):
        K1, K2, _ = g.frac.shape
        k1 = K1 - 1 if predict else 0
        diag = np.array([g.frac[k1, k, k if up else 0] for k in range(K2)])
        for lv, level in enumerate(levels):
            if predict and diag[0] > level:  # the predictor alone skips too much
                col = g.frac[:, 0, 0]
                j = int(np.argmin(np.abs(col - level)))
                states[lv, il] = (j, 0, 0)
            else:
                states[lv, il] = (k1, int(np.argmin(np.abs(diag - level))), 0)
                if up:
                    states[lv, il, 2] = states[lv, il, 1]
    return states


def _greedy(grids: list[_LayerGrid], levels: np.ndarray, points: tuple[int, ...]) -> np.ndarray:
    n_layer = len(grids)
    tb = np.array([g.total_bytes for g in grids])
    tb = tb / tb.sum()
    state = np.zeros((n_layer, 3), dtype=np.int64)
    cost = np.full((n_layer, 3), np.inf)
    target = np.zeros((n_layer, 3), dtype=np.int64)

    def update(il: int) -> None:
        g = grids[il]
        s = tuple(state[il])
        f0, e0 = g.frac[s], g.err[s]
        for p in range(3):
            cost[il, p] = np.inf
            if p + 1 not in points:
                continue
            k = list(s)
            while k[p] + 1 < g.frac.shape[p]:
                k[p] += 1
                df = g.frac[tuple(k)] - f0
                if df > 1e-12:
                    cost[il, p] = max(g.err[tuple(k)] - e0, 0.0) / (df * tb[il])
                    target[il, p] = k[p]
                    break

    for il in range(n_layer):
        update(il)
    states = np.zeros((len(levels), n_layer, 3), dtype=np.int64)
    achieved = 0.0
    lv = 0
    while lv < len(levels):
        while lv < len(levels) and achieved >= levels[lv] - 1e-9:
            states[lv] = state
            lv += 1
        if lv >= len(levels):
            break
        il, p = np.unravel_index(int(np.argmin(cost)), cost.shape)
        if not np.isfinite(cost[il, p]):  # nothing left to skip: the sparsest state
            states[lv:] = state
            break
        g = grids[il]
        achieved -= g.frac[tuple(state[il])] * tb[il]
        state[il, p] = target[il, p]
        achieved += g.frac[tuple(state[il])] * tb[il]
        update(int(il))
    return states


def allocate(
    stats: CalibrationStats,
    levels: tuple[float, ...] | np.ndarray = DEFAULT_LEVELS,
    *,
    method: str = DEFAULT_ALLOCATION,
    precision: float = DEFAULT_PRECISION,
    keep: list[np.ndarray] | None = None,
    row_bytes: np.ndarray | None = None,
    grid: int = 129,
    grid_predict: tuple[int, int] = (12, 33),
    seed: int = 0,
) -> Tables:
    """Threshold tables for ``levels`` (fractions of FFN weight bytes skipped).

    ``method``: ``greedy``, ``uniform`` or ``cats``. ``keep``: per layer, the dense
    indices (or a boolean mask) of the neurons the sparse model keeps; the
    others are dead and count neither as bytes nor as error. ``grid``:
    threshold candidates per point in mode threshold; ``grid_predict``:
    (alpha candidates, threshold candidates per point) in mode predict.
    ``row_bytes``: ``[n_layer, 3]`` bytes of a gate, up and down row in the
    sparse file (default: the dense file's, ``stats.row_bytes``; they differ
    when ``ffn_down_t`` gets a wider type).
    """
    if row_bytes is not None:
        stats = dataclasses.replace(stats, row_bytes=np.asarray(row_bytes, dtype=np.float64))
    if method not in ALLOCATIONS:
        raise ValueError(f"unknown allocation method {method!r}")
    lv = np.asarray(levels, dtype=np.float64)
    if np.any(np.diff(lv) <= 0) or lv.min() <= 0 or lv.max() >= 1:
        raise ValueError("levels must be increasing, in (0, 1)")
    alpha_cal = calibrate_alpha(stats, precision)
    rng = np.random.default_rng(seed)
    cols = [_keep(stats, il, keep) for il in range(stats.n_layer)]
    g_thr: list[_LayerGrid] = []
    g_pre: list[_LayerGrid] = []
    for il in range(stats.n_layer):
        a, b = _layer_grids(
            stats, il, cols[il], float(alpha_cal[il]), grid, grid_predict, rng, method == "cats"
        )
        g_thr.append(a)
        g_pre.append(b)
    if method == "greedy":
        s_thr = _greedy(g_thr, lv, (2, 3))
        s_pre = _greedy(g_pre, lv, (1, 2, 3))
    else:
        s_thr = _uniform(g_thr, lv, predict=False, up=method == "uniform")
        s_pre = _uniform(g_pre, lv, predict=True, up=method == "uniform")
    return Tables(
        levels=lv.astype(np.float32),
        allocation=method,
        predictor_alpha=alpha_cal,
        threshold=_mode_table(g_thr, s_thr),
        predict=_mode_table(g_pre, s_pre),
    )


# -- evaluation --------------------------------------------------------------


@dataclass
class Applied:
    sparsity: float  # fraction of FFN weight bytes skipped per token
    error: float  # mean over layers of the relative error
    layer_sparsity: np.ndarray  # [n_layer]
    layer_error: np.ndarray  # [n_layer]


def apply_rows(
    stats: CalibrationStats,
    alpha: np.ndarray,
    gate: np.ndarray,
    up: np.ndarray,
    *,
    ref: CalibrationStats | None = None,
    keep: list[np.ndarray] | None = None,
    plain_gate: bool = False,
) -> list[Applied]:
    """Apply table rows (``[R, n_layer]`` arrays of point-1/2/3 thresholds) to
    ``stats``' sample tokens with the runtime's rules, independently of the
    allocation's grids; one result per row.

    ``ref``: the calibration run whose ``up_absmean``/``down_norm`` the GGUF
    stores (use it when ``stats`` is a held-out run); default ``stats``.
    ``plain_gate``: point 2 scores plain ``|act(g)|`` (``Tables.plain_gate``).
    """
    alpha, gate, up = (np.atleast_2d(np.asarray(a, dtype=np.float32)) for a in (alpha, gate, up))
    R = alpha.shape[0]
    fr = np.zeros((R, stats.n_layer))
    er = np.zeros((R, stats.n_layer))
    tb = np.zeros(stats.n_layer)
    for il in range(stats.n_layer):
        cols = _keep(stats, il, keep)
        nneg, s2, s3 = _scores(stats, il, cols, ref, plain_gate)
        e = s3.astype(np.float64) ** 2
        etot = max(float(e.sum()), 1e-300)
        bg, bu, bd = stats.row_bytes[il]
        tb[il] = len(cols) * (bg + bu + bd)
        for r in range(R):
            skip1 = predict_skip(nneg, stats.n_embd, float(alpha[r, il]))
            skip2 = ~skip1 & (s2 < gate[r, il])
            skip3 = ~skip1 & ~skip2 & (s3 < up[r, il])
            saved = skip1.sum() * (bg + bu + bd) + skip2.sum() * (bu + bd) + skip3.sum() * bd
            fr[r, il] = saved / (skip1.size * (bg + bu + bd))
            er[r, il] = e[skip1 | skip2 | skip3].sum() / etot
    return [
        Applied(
            sparsity=float((fr[r] * tb).sum() / tb.sum()),
            error=float(er[r].mean()),
            layer_sparsity=fr[r],
            layer_error=er[r],
        )
        for r in range(R)
    ]


def apply_tables(
    stats: CalibrationStats,
    tables: Tables,
    mode: str,
    *,
    ref: CalibrationStats | None = None,
    keep: list[np.ndarray] | None = None,
) -> list[Applied]:
    """Apply every level of mode ``threshold`` or ``predict`` of ``tables``."""
    t = tables.threshold if mode == "threshold" else tables.predict
    return apply_rows(
        stats, t.alpha, t.gate, t.up, ref=ref, keep=keep, plain_gate=tables.plain_gate
    )


def apply_level(
    stats: CalibrationStats,
    tables: Tables,
    level: int,
    mode: str,
    *,
    ref: CalibrationStats | None = None,
    keep: list[np.ndarray] | None = None,
) -> Applied:
    """Apply row ``level`` of mode ``threshold`` or ``predict`` of ``tables``."""
    t = tables.threshold if mode == "threshold" else tables.predict
    sl = slice(level, level + 1)
    return apply_rows(
        stats, t.alpha[sl], t.gate[sl], t.up[sl], ref=ref, keep=keep, plain_gate=tables.plain_gate
    )[0]
