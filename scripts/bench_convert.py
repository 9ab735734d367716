#!/usr/bin/env python3
"""Converter benchmark: time, sizes, dead neurons and quality with sparsity off.

    python scripts/bench_convert.py [--models smollm2-135m gemma3-270m] [--eval-chars 40000]

For each real model: converts it with the default options (once more
without pruning, to separate the cost of pruning from the cost of the
requantized ffn_down_t, and once more without error compensation in
ffn_down_t), then measures perplexity, mean KL divergence and top-1
agreement against the dense model with our llama-perplexity on the
evaluation text (disjoint from the calibration text). Also converts a
synthetic GGUF with Llama-2-7B layer shapes (random weights) for the time.
Prints tables and rewrites its section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import benchdoc
from gguf import GGUFReader

from llama_sparse import models, quality
from llama_sparse.convert import synthetic
from llama_sparse.convert.pipeline import ConvertResult, convert
from llama_sparse.convert.structure import identity_plan, open_dense, write_sparse
from llama_sparse.convert.text import evaluation_text


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def sign_bytes(r: ConvertResult, n_embd: int) -> int:
    return sum(w - d for w, d in zip(r.original, r.dead, strict=True)) * -(-n_embd // 32) * 4


def down_t_type(dense: Path, sparse: Path) -> str:
    """ffn_down_t's type(s) in `sparse`, against the dense ffn_down's, e.g. "Q4_1 -> Q8_0"."""

    def types(path: Path, name: str) -> str:
        ts = {t.tensor_type.name for t in GGUFReader(path).tensors if t.name.endswith(name)}
        return "/".join(sorted(ts))

    return f"{types(dense, 'ffn_down.weight')} -> {types(sparse, 'ffn_down_t.weight')}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--eval-chars", type=int, default=40000, help="evaluation text length")
    ap.add_argument("--ctx", type=int, default=512, help="perplexity context (default: 512)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/BENCHMARKS.md")
    args = ap.parse_args()

    text, source = evaluation_text()
    conv_rows, qual_rows, layer_rows = [], [], []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        eval_file = tmp / "eval.txt"
        eval_file.write_text(text[: args.eval_chars])
        for name in args.models:
            src = models.fetch(name)
            n_embd = open_dense(src).n_embd
            out = tmp / f"{name}.sparse.gguf"
            r = convert(src, out, threads=args.threads)
            nopr = convert(src, tmp / f"{name}.noprune.gguf", prune=False, threads=args.threads)
            nocomp = convert(src, tmp / f"{name}.nocomp.gguf", compensate=False,
                             threads=args.threads)  # fmt: skip
            dead, total = sum(r.dead), sum(r.original)
            conv_rows.append(
                f"| {name} | {r.seconds:.1f} | {r.calibration_tokens} | {r.tokens_per_second:.0f} "
                f"| {dead} ({dead / total:.2%}) | {mib(r.input_bytes)} | {mib(r.output_bytes)} "
                f"| {mib(sign_bytes(r, n_embd))} | {down_t_type(src, out)} |"
            )
            layer_rows.append(
                f"| {name} | "
                + " ".join(f"{d / n:.1%}" for d, n in zip(r.dead, r.original, strict=True))
                + " |"
            )
            runs = {"converted (default)": out, "converted, --no-prune": nopr.output,
                    "converted, --no-compensate": nocomp.output}  # fmt: skip
            qs = quality.compare(src, list(runs.values()), eval_file, ctx=args.ctx,
                                 threads=args.threads)  # fmt: skip
            for (label, path), q in zip(runs.items(), qs, strict=True):
                qual_rows.append(
                    f"| {name} | {label} ({down_t_type(src, path)}) | {q.ppl_base:.4f} "
                    f"| {q.ppl:.4f} | {q.ppl_change:+.3%} ± {q.ppl_change_2se:.3%} "
                    f"| {q.mean_kld:.5f} | {q.top1:.2%} |"
                )
            q_pr, q_np = qs[0], qs[1]
            qual_rows.append(
                f"| {name} | pruning alone | {q_np.ppl:.4f} | {q_pr.ppl:.4f} "
                f"| {q_pr.ppl / q_np.ppl - 1:+.3%} | | |"
            )

        syn = synthetic.write_synthetic(tmp / "syn7b.gguf", models.fetch("smollm2-135m"),
                                        synthetic.SHAPES["llama2-7b"], n_layer=2)  # fmt: skip
        t0 = time.perf_counter()
        write_sparse(syn, tmp / "syn7b.sparse.gguf", identity_plan(open_dense(syn)))
        t_write = time.perf_counter() - t0
        rs = convert(syn, tmp / "syn7b.conv.gguf", n_tokens=2048, threads=args.threads)

    tables = "\n".join(
        [
            "| model | convert s | calibration tokens | tokens/s | dead neurons | input MiB "
            "| output MiB | of which sign bits MiB | ffn_down_t |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
            *conv_rows,
            "",
            "Dead neurons per layer (fraction of the layer's width):",
            "",
            "| model | layers 0, 1, 2, ... |",
            "|---|---|",
            *layer_rows,
            "",
            f"Quality with sparsity off, against the dense model, on {args.eval_chars} characters "
            f"of {source}, context {args.ctx}; ± is two standard errors of the change "
            "(llama-perplexity's own estimate: what the same files may show on another text "
            "of this length):",
            "",
            "| model | file (ffn_down_t) | PPL dense | PPL | change | mean KLD | top-1 agreement |",
            "|---|---|---:|---:|---:|---:|---:|",
            *qual_rows,
            "",
            "Synthetic GGUF with Llama-2-7B layer shapes (n_embd 4096, n_ff 11008), 2 layers, "
            "Q4_0, random weights:",
            "",
            "| step | seconds |",
            "|---|---:|",
            f"| write the sparse file (identity plan) | {t_write:.1f} |",
            f"| full convert, {rs.calibration_tokens} calibration tokens | {rs.seconds:.1f} |",
        ]
    )
    print(tables)
    if not args.no_doc:
        cmd = " ".join(["python scripts/bench_convert.py", *sys.argv[1:]])
        section = f"Made by `{cmd}` on {benchdoc.machine()}, {args.threads} threads.\n\n{tables}"
        benchdoc.write_section("bench_convert", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
