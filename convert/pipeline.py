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
from .allocate import DEFAULT_LEVELS, Tables, allocate
from .calibrate import CalibrationStats, calibrate
from .structure import LayerPlan, SparsePlan

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
    tables: Tables
    input_bytes: int
    output_bytes: int

    @property
    def tokens_per_second(self) -> float:
        return self.calibration_tokens / self.calibration_seconds


def dead_mask(stats: CalibrationStats, il: int, tolerance: float) -> np.ndarray:
    """Neurons whose contribution never exceeded `tolerance` x the layer's mean contribution."""
    typical = float(np.mean(stats.h_absmean[il] * stats.down_norm[il]))
    return stats.score3_max(il) <= tolerance * typical


def make_plan(
    stats: CalibrationStats, *, dead_tolerance: float, prune: bool, reorder: bool
) -> SparsePlan:
    layers = []
    for il in range(len(stats.n_ff)):
        keep = np.arange(stats.n_ff[il])
        if prune:
            keep = keep[~dead_mask(stats, il, dead_tolerance)]
        if reorder:
            keep = stats.hot_order(il, keep)
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
    levels: tuple[float, ...] = DEFAULT_LEVELS,
    allocation: str = "greedy",
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
    tables = allocate(stats, levels, method=allocation, keep=[lp.keep for lp in plan.layers])
    plan.metadata.update(tables.metadata())
    # what each mode reached on calibration text, per level: the runtime refuses
    # a level its mode cannot reach (threshold mode always reads the gate rows)
    plan.metadata["sparse.threshold.achieved"] = tables.threshold.achieved
    plan.metadata["sparse.predict.achieved"] = tables.predict.achieved
    structure.write_sparse(src, dst, plan, progress=progress)
    return ConvertResult(
        output=dst,
        seconds=time.perf_counter() - t0,
        calibration_seconds=stats.seconds,
        calibration_tokens=stats.n_tokens,
        dead=[stats.n_ff[i] - len(lp.keep) for i, lp in enumerate(plan.layers)],
        original=list(stats.n_ff),
        tables=tables,
        input_bytes=src.stat().st_size,
        output_bytes=dst.stat().st_size,
    )
