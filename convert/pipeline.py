"""`llama-sparse convert`: calibrate, prune, reorder, allocate, write.

dense GGUF --calibrate--> per-neuron statistics (convert.calibrate)
           --plan------> dead neurons dropped, the rest hot-first (here)
           --allocate--> predictor alpha and threshold tables (convert.allocate)
           --write-----> sparse GGUF (convert.structure)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import structure
from .calibrate import CalibrationStats, calibrate
from .structure import LayerPlan, SparsePlan

DEFAULT_LEVELS = tuple(round(0.1 * i, 1) for i in range(1, 10))
# A neuron is dead when its weight-aware contribution |act(g) u| * ||down||
# never exceeded this fraction of its layer's mean contribution.
DEFAULT_DEAD_TOLERANCE = 0.01


@dataclass
class ConvertResult:
    output: Path
    seconds: float
    calibration_seconds: float
    calibration_tokens: int
    dead: list[int]
    original: list[int]
    input_bytes: int
    output_bytes: int

    @property
    def tokens_per_second(self) -> float:
        return self.calibration_tokens / self.calibration_seconds


def dead_mask(stats: CalibrationStats, il: int, tolerance: float) -> np.ndarray:
    """Neurons whose contribution never exceeded `tolerance` x the layer's mean contribution."""
    peak = stats.h_absmax[il] * stats.down_norm[il]
    typical = float(np.mean(stats.h_absmean[il] * stats.down_norm[il]))
    return peak <= tolerance * typical


def make_plan(
    stats: CalibrationStats, *, dead_tolerance: float, prune: bool, reorder: bool
) -> SparsePlan:
    layers = []
    for il in range(len(stats.n_ff)):
        keep = np.arange(stats.n_ff[il])
        if prune:
            keep = keep[~dead_mask(stats, il, dead_tolerance)]
        if reorder:  # hot-first: most often active first (stable: ties keep dense order)
            keep = keep[np.argsort(-stats.freq[il][keep], kind="stable")]
        layers.append(LayerPlan(keep.astype(np.int32), stats.up_absmean[il][keep]))
    return SparsePlan(
        layers,
        metadata={
            "sparse.calibration.source": stats.source,
            "sparse.calibration.tokens": np.uint32(stats.n_tokens),
            "sparse.dead_tolerance": np.float32(dead_tolerance if prune else 0.0),
        },
    )


def convert(
    src: Path,
    dst: Path,
    *,
    text: str | None = None,
    source: str = "",
    n_tokens: int = 16384,
    dead_tolerance: float = DEFAULT_DEAD_TOLERANCE,
    prune: bool = True,
    reorder: bool = True,
    threads: int | None = None,
    progress: bool = True,
) -> ConvertResult:
    """Convert the dense GGUF `src` into the sparse GGUF `dst` (see docs/FORMAT.md)."""
    src, dst = Path(src), Path(dst)
    structure.open_dense(src)  # refuse bad input before the long calibration
    if dst.resolve() == src.resolve():
        raise structure.ConvertError(f"refusing to write over the input {src}")
    t0 = time.perf_counter()
    stats = calibrate(src, text, n_tokens, n_threads=threads, source=source, progress=progress)
    plan = make_plan(stats, dead_tolerance=dead_tolerance, prune=prune, reorder=reorder)
    structure.write_sparse(src, dst, plan, progress=progress)
    return ConvertResult(
        output=dst,
        seconds=time.perf_counter() - t0,
        calibration_seconds=stats.seconds,
        calibration_tokens=stats.n_tokens,
        dead=[stats.n_ff[i] - len(lp.keep) for i, lp in enumerate(plan.layers)],
        original=list(stats.n_ff),
        input_bytes=src.stat().st_size,
        output_bytes=dst.stat().st_size,
    )
