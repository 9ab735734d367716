"""`llama-sparse convert`: calibrate, prune, reorder, allocate, write.

dense GGUF --calibrate--> per-neuron statistics (convert.calibrate)
           --plan------> dead neurons dropped, the rest hot-first (here)
           --allocate--> predictor alpha and threshold tables (convert.allocate)
           --write-----> sparse GGUF (convert.structure)
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llama_sparse import quality

from . import structure
from .allocate import DEFAULT_ALLOCATION, DEFAULT_LEVELS, Tables, allocate
from .calibrate import CalibrationStats, calibrate
from .structure import QT, LayerPlan, SparsePlan
from .text import calibration_text

# A neuron is dead when its weight-aware contribution |act(g) u| * ||down||
# never exceeded this fraction of its layer's mean contribution.
DEFAULT_DEAD_TOLERANCE = 0.01
# ffn_down_t requantized along the other axis may cost more than this much
# perplexity; then the next wider type is stored (docs/FORMAT.md).
DOWN_T_MAX_PPL_CHANGE = 0.005
DOWN_T_WIDER = (QT.Q8_0, QT.F16)
# the check runs on the end of the default calibration text: calibration reads
# its beginning (16k tokens are ~65k of its ~250k characters)
DOWN_T_CHECK_CHARS = 12000


@dataclass
class ConvertResult:
    output: Path
    seconds: float
    calibration_seconds: float
    calibration_tokens: int
    dead: list[int]
    original: list[int]
    tables: Tables
    down_t_ppl_change: float | None  # measured perplexity cost of ffn_down_t, None: lossless
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
    stats: CalibrationStats,
    *,
    dead_tolerance: float,
    prune: bool,
    reorder: bool,
    compensate: bool = True,
) -> SparsePlan:
    layers = []
    for il in range(len(stats.n_ff)):
        keep = np.arange(stats.n_ff[il])
        if prune:
            keep = keep[~dead_mask(stats, il, dead_tolerance)]
        if reorder:
            keep = stats.hot_order(il, keep)
        h = stats.sample_h(il)[:, keep] if compensate else None
        layers.append(LayerPlan(keep.astype(np.int32), stats.up_absmean[il][keep], h))
    return SparsePlan(
        layers,
        metadata={
            "sparse.calibration.source": stats.source,
            "sparse.calibration.tokens": np.uint32(stats.n_tokens),
            "sparse.dead_tolerance": np.float32(dead_tolerance if prune else 0.0),
        },
    )


def write_checked(
    src: Path, dst: Path, plan: SparsePlan, *, threads: int | None, progress: bool
) -> float | None:
    """Write `plan`; when ffn_down_t is requantized, measure what it costs in perplexity
    against the dense model and widen its type while the cost exceeds 0.5 %."""
    model = structure.open_dense(src)
    lossless = all(
        model.tensor(f"blk.{il}.ffn_down.weight").tensor_type in structure.LOSSLESS
        for il in range(model.n_layer)
    )
    if lossless or plan.down_type is not None:
        structure.write_sparse(src, dst, plan, progress=progress)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        check = Path(tmp) / "check.txt"
        check.write_text(calibration_text()[0][-DOWN_T_CHECK_CHARS:])
        tried = []
        with quality.Reference(src, check, threads=threads or 2) as ref:
            for wider in (None, *DOWN_T_WIDER):
                plan.down_type = wider
                structure.write_sparse(src, dst, plan, progress=progress)
                q = ref.compare(dst)
                if q.ppl_change <= DOWN_T_MAX_PPL_CHANGE:
                    break
                tried.append(
                    f"{wider.name if wider else 'the input type'} cost {q.ppl_change:+.2%} "
                    f"± {q.ppl_change_2se:.2%}"
                )
    plan.metadata["sparse.down_t.ppl_change"] = np.float32(q.ppl_change)
    if tried:
        plan.metadata["sparse.down_t.reason"] = (
            f"{plan.down_type.name}: requantized, {', '.join(tried)} perplexity (limit "
            f"{DOWN_T_MAX_PPL_CHANGE:.1%}); this type {q.ppl_change:+.2%} ± {q.ppl_change_2se:.2%} "
            f"(two standard errors on {DOWN_T_CHECK_CHARS} characters)"
        )
    structure.write_sparse(src, dst, plan, progress=progress)  # with the measured cost recorded
    return q.ppl_change


def convert(
    src: Path,
    dst: Path,
    *,
    text: str | None = None,
    source: str = "",
    n_tokens: int = 16384,
    levels: tuple[float, ...] = DEFAULT_LEVELS,
    allocation: str = DEFAULT_ALLOCATION,
    dead_tolerance: float = DEFAULT_DEAD_TOLERANCE,
    prune: bool = True,
    reorder: bool = True,
    compensate: bool = True,
    down_type: QT | None = None,
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
    plan = make_plan(
        stats, dead_tolerance=dead_tolerance, prune=prune, reorder=reorder, compensate=compensate
    )
    plan.down_type = down_type
    tables = allocate(stats, levels, method=allocation, keep=[lp.keep for lp in plan.layers])
    plan.plain_gate = tables.plain_gate
    plan.metadata.update(tables.metadata())
    # what each mode reached on calibration text, per level: the runtime refuses
    # a level its mode cannot reach (threshold mode always reads the gate rows)
    plan.metadata["sparse.threshold.achieved"] = tables.threshold.achieved
    plan.metadata["sparse.predict.achieved"] = tables.predict.achieved
    down_t_cost = write_checked(src, dst, plan, threads=threads, progress=progress)
    return ConvertResult(
        output=dst,
        seconds=time.perf_counter() - t0,
        calibration_seconds=stats.seconds,
        calibration_tokens=stats.n_tokens,
        dead=[stats.n_ff[i] - len(lp.keep) for i, lp in enumerate(plan.layers)],
        original=list(stats.n_ff),
        tables=tables,
        down_t_ppl_change=down_t_cost,
        input_bytes=src.stat().st_size,
        output_bytes=dst.stat().st_size,
    )
