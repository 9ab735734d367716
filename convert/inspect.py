"""`llama-sparse inspect`: what a GGUF file holds, in the terms of docs/FORMAT.md."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader

from .structure import read_gguf


def _kv(reader: GGUFReader) -> dict[str, Any]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def summary(path: Path) -> str:
    """A human-readable summary of a sparse GGUF, or a statement that the file is dense."""
    path = Path(path)
    reader = read_gguf(path)
    kv = _kv(reader)
    arch = kv.get("general.architecture", "?")
    size = path.stat().st_size
    if "sparse.format_version" not in kv:
        return (
            f"{path}: dense GGUF ({arch}, {size / 2**20:.1f} MiB), not converted by llama-sparse; "
            f"`llama-sparse convert {path.name} OUT.gguf` makes a sparse one"
        )

    lines = [
        f"{path}: sparse GGUF, format version {kv['sparse.format_version']}",
        f"  architecture   {arch}, activation {kv.get('sparse.activation', '?')}",
        f"  written by     {kv.get('sparse.method', '?')}",
        f"  size           {size / 2**20:.1f} MiB",
    ]
    if "sparse.calibration.tokens" in kv:
        lines.append(
            f"  calibration    {kv['sparse.calibration.tokens']} tokens of "
            f"{kv.get('sparse.calibration.source', '?')}"
        )
    lines.append(f"  ffn_down_t     {kv.get('sparse.down_t.reason', '?')}")

    widths = kv[f"{arch}.feed_forward_length"]
    widths = widths if isinstance(widths, list) else [widths]
    original = kv.get("sparse.original_ff_length", widths)
    dead = kv.get("sparse.dead_neurons", [0] * len(widths))
    alpha = kv.get("sparse.predictor.alpha")
    lines.append("  layer  width / dense   dead" + ("   alpha" if alpha else ""))
    for il, (w, n, d) in enumerate(zip(widths, original, dead, strict=True)):
        row = f"  {il:5d}  {w:5d} / {n:<5d}  {d / n:5.1%}"
        lines.append(row + (f"  {alpha[il]:6.3f}" if alpha else ""))
    total_dead = sum(dead) / sum(original)
    lines.append(f"  dead neurons   {sum(dead)} of {sum(original)} ({total_dead:.2%})")

    levels = kv.get("sparse.levels")
    if levels:
        lines.append(
            f"  levels         {', '.join(f'{x:g}' for x in levels)} "
            f"({kv.get('sparse.allocation', '?')} allocation)"
        )
    else:
        lines.append("  levels         none (no threshold table)")

    by_kind: dict[str, int] = defaultdict(int)
    for t in reader.tensors:
        kind = t.name.split(".", 2)[2] if t.name.startswith("blk.") else "other"
        if not kind.startswith("ffn_"):
            kind = "other"
        by_kind[kind] += int(np.prod(t.data.shape)) * t.data.dtype.itemsize
    lines.append("  bytes by tensor kind")
    for kind, n in sorted(by_kind.items(), key=lambda x: -x[1]):
        lines.append(f"    {kind:<22} {n / 2**20:8.2f} MiB")
    return "\n".join(lines)
