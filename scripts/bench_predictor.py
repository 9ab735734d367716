#!/usr/bin/env python3
"""The sign-bit predictor's precision and recall per layer, on evaluation text.

    python scripts/bench_predictor.py [--models smollm2-135m gemma3-270m] [--tokens 4096]

For each real model, the dense GGUF runs on evaluation text (disjoint from the
calibration text) through the converter's calibration pass, which records per
layer how many sign bits of x disagree with each gate row (n_neg) for gates
that are truly negative and for the others. From those counts, exactly, for
the alpha the converter calibrated into the sparse GGUF
(`sparse.predictor.alpha`) and for SparseInfer's alpha = 1:

* skipped: the fraction of neurons the predictor skips (mask point 1);
* precision: of the skipped neurons, the fraction whose gate is negative;
* recall: of the neurons with a negative gate, the fraction skipped.

A skipped neuron with a positive gate is signal lost (SiLU/GeGLU keep
negative gates too, so even precision 1 is not lossless there; on a ReLU
model it is). Prints the tables and rewrites its section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys

import benchdoc
import numpy as np
from bench_sparse import sparse_model
from gguf import GGUFReader

from llama_sparse import models
from llama_sparse.convert.allocate import predict_skip
from llama_sparse.convert.calibrate import CalibrationStats, calibrate
from llama_sparse.convert.text import evaluation_text


def rates(stats: CalibrationStats, il: int, alpha: float) -> tuple[float, float, float]:
    """Skipped fraction, precision and recall of layer il's predictor at alpha."""
    skip = predict_skip(np.arange(stats.n_embd + 1), stats.n_embd, alpha)
    neg, pos = stats.nneg_hist_neg[il], stats.nneg_hist_pos[il]
    hit, miss = float(neg[skip].sum()), float(pos[skip].sum())
    total, negative = float(neg.sum() + pos.sum()), float(neg.sum())
    precision = hit / (hit + miss) if hit + miss else float("nan")
    recall = hit / negative if negative else float("nan")
    return (hit + miss) / total, precision, recall


def table(name: str, stats: CalibrationStats, alpha: np.ndarray) -> str:
    lines = [
        f"**{name}** ({stats.n_tokens} evaluation tokens, activation {stats.activation})",
        "",
        "| layer | alpha | skipped | precision | recall | skipped (alpha 1) | precision (alpha 1) "
        "| recall (alpha 1) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cal, one = [], []
    for il in range(len(alpha)):
        cal.append(rates(stats, il, float(alpha[il])))
        one.append(rates(stats, il, 1.0))
        a = f"{alpha[il]:.3f}" if alpha[il] > 0 else "off"
        cells = [f"{v:.3f}" for v in (*cal[-1], *one[-1])]
        lines.append(f"| {il} | {a} | " + " | ".join(cells) + " |")
    mean = [f"{np.nanmean([r[k] for r in rows]):.3f}" for rows in (cal, one) for k in range(3)]
    lines.append("| mean | | " + " | ".join(mean) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (default: 4096)")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/BENCHMARKS.md")
    args = ap.parse_args()

    text, source = evaluation_text()
    sections = []
    for name in args.models:
        dense = models.resolve(name)
        sparse = sparse_model(dense, args.threads)
        field = GGUFReader(sparse).fields["sparse.predictor.alpha"]
        alpha = np.array([field.parts[i][0] for i in field.data], dtype=np.float32)
        stats = calibrate(dense, text=text, n_tokens=args.tokens, n_threads=args.threads,
                          n_samples=16, source=source)  # fmt: skip
        sections.append(table(name, stats, alpha))
        print(sections[-1] + "\n")

    if not args.no_doc:
        cmd = " ".join(["python scripts/bench_predictor.py", *sys.argv[1:]])
        head = (
            f"Sign-bit predictor per layer, made by `{cmd}` on {benchdoc.machine()}: alpha as "
            "calibrated by the converter (target precision on the calibration text; off where "
            "no alpha reaches it) and SparseInfer's alpha 1, measured on the evaluation text "
            f"({source}). Precision: skipped neurons whose gate is negative; recall: negative "
            "gates skipped."
        )
        benchdoc.write_section("bench_predictor", head + "\n\n" + "\n\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
