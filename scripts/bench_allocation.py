#!/usr/bin/env python3
"""Quality per byte: how a sparsity level is split, compared on the real models.

    python scripts/bench_allocation.py [--models smollm2-135m gemma3-270m]
                                       [--levels 0.1 0.3 0.5 0.6]

Each model is converted three times from the same calibration, differing only
in the threshold table (`llama-sparse convert --allocation`):

* greedy: the least calibration error per byte skipped, over layers and the
  mask points after the gate and after up, weight-aware scores;
* uniform: every layer skips the same share of its bytes, both points at the
  same quantile of their weight-aware scores;
* cats: CATS's plain |act(gate)| thresholding after the gate, every layer the
  same share.

At each level of mode threshold (equal FFN bytes skipped on the calibration
text) it measures, on evaluation text disjoint from calibration, the sparsity
the runtime reached and perplexity, mean KL divergence and top-1 agreement
against the dense model, and says which allocation has the lowest mean KL
(the converter's default should be that one).
Prints the tables and rewrites its section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import benchdoc
from bench_sparse import Setting, convert_cached, converted, measure_sparsity, sparse_model
from gguf import GGUFReader

from llama_sparse import Llama, models, quality
from llama_sparse.convert.allocate import ALLOCATIONS, DEFAULT_ALLOCATION
from llama_sparse.convert.structure import QT
from llama_sparse.convert.text import evaluation_text


def allocation_models(dense: Path, threads: int) -> dict[str, Path]:
    """The sparse GGUF of `dense` for each allocation. The default one is bench_sparse's; the
    others are cached beside it as `<name>.<allocation>.gguf` and take its ffn_down_t type, so
    that the files differ in their tables alone (and the type check is not run again)."""
    default = sparse_model(dense, threads)
    down = next(t for t in GGUFReader(default).tensors if t.name.endswith("ffn_down_t.weight"))
    files = {}
    for alloc in ALLOCATIONS:
        path = default.with_name(default.name.replace(".sparse.", f".{alloc}."))
        if alloc == DEFAULT_ALLOCATION:
            path = default
        elif not converted(path):
            convert_cached(dense, path, allocation=alloc, down_type=QT(int(down.tensor_type)),
                           threads=threads)  # fmt: skip
        files[alloc] = path
    return files


def table(name: str, files: dict[str, Path], levels: list[float], args: argparse.Namespace,
          eval_file: Path) -> tuple[str, dict[str, list[float]]]:  # fmt: skip
    """The model's markdown table and each allocation's mean KL per level."""
    llm = Llama(model_path=str(files[DEFAULT_ALLOCATION]), n_ctx=64, verbose=False)
    tokens = llm.tokenize(eval_file.read_text()[:6000].encode())[:768]
    llm.close()
    runs = [(alloc, Setting("threshold", lv)) for lv in levels for alloc in files]
    with quality.Reference(models.resolve(name), eval_file, ctx=args.ctx,
                           threads=args.threads) as ref:  # fmt: skip
        results = {}
        for alloc, s in runs:
            sparsity = measure_sparsity(files[alloc], s, tokens, args.threads)
            results[alloc, s.level] = (sparsity, ref.compare(files[alloc], s.flags()))
            q = results[alloc, s.level][1]
            print(f"{name} {alloc} {s.level:g}: sparsity {sparsity:.3f} "
                  f"KLD {q.mean_kld:.4f}", file=sys.stderr)  # fmt: skip
    head = " | ".join(f"{a}: sparsity, PPL change, mean KLD, top-1" for a in files)
    lines = [f"| level | {head} | lowest KLD |", "|---:|" + "---:|" * len(files) + "---|"]
    for lv in levels:
        cells = []
        for alloc in files:
            sp, q = results[alloc, lv]
            cells.append(f"{sp:.3f}, {q.ppl_change:+.1%}, {q.mean_kld:.4f}, {q.top1:.1%}")
        best = min(files, key=lambda a: results[a, lv][1].mean_kld)
        lines.append(f"| {lv:g} | " + " | ".join(cells) + f" | {best} |")
    kld = {a: [results[a, lv][1].mean_kld for lv in levels] for a in files}
    return "\n".join(lines), kld


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models", nargs="*", default=["smollm2-135m", "gemma3-270m"], help="real models"
    )
    ap.add_argument("--levels", type=float, nargs="*", default=[0.1, 0.3, 0.5, 0.6],
                    help="levels of mode threshold (default: 0.1 0.3 0.5 0.6)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2, help="threads (default: 2)")
    ap.add_argument("--ctx", type=int, default=512, help="perplexity context (default: 512)")
    ap.add_argument("--eval-chars", type=int, default=20000, help="evaluation text length")
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/BENCHMARKS.md")
    args = ap.parse_args()

    parts = []
    kld: dict[str, list[float]] = {a: [] for a in ALLOCATIONS}
    with tempfile.TemporaryDirectory() as tmp:
        text, source = evaluation_text()
        eval_file = Path(tmp) / "eval.txt"
        eval_file.write_text(text[: args.eval_chars])
        for name in args.models:
            files = allocation_models(models.resolve(name), args.threads)
            tab, model_kld = table(name, files, args.levels, args, eval_file)
            print(f"\n{name}\n{tab}")
            parts.append(f"**{name}**, mode threshold:\n\n{tab}")
            for a in ALLOCATIONS:
                kld[a] += model_kld[a]
    n = len(kld[DEFAULT_ALLOCATION])
    wins = {a: sum(kld[a][i] == min(k[i] for k in kld.values()) for i in range(n)) for a in kld}
    mean = {a: sum(v) / n for a, v in kld.items()}
    lowest = min(mean, key=mean.__getitem__)
    verdict = (
        f"Over the {n} (model, level) pairs: mean KL "
        + ", ".join(f"{a} {mean[a]:.3f} (lowest at {wins[a]})" for a in ALLOCATIONS)
        + f". Lowest mean KL: {lowest}. The converter's default is {DEFAULT_ALLOCATION}."
    )
    print(f"\n{verdict}")
    if not args.no_doc:
        cmd = " ".join(["python scripts/bench_allocation.py", *sys.argv[1:]])
        head = (
            f"Made by `{cmd}` on {benchdoc.machine()}, {args.threads} threads; sparsity "
            f"measured and quality on {args.eval_chars} characters of {source}, context "
            f"{args.ctx}. Each cell: FFN byte sparsity the runtime measured, perplexity "
            "change, mean KL divergence and top-1 agreement against the dense model."
        )
        benchdoc.write_section("bench_allocation", "\n\n".join([head, *parts, verdict]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
