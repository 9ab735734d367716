#!/usr/bin/env python3
"""Speed parity: llama-sparse (sparsity off) beside unpatched upstream, in one run.

    python scripts/bench_parity.py [--model smollm2-135m] [--rounds 5] [--threads 2]

Runs llama-bench from our installed package and from the unpatched reference
build (vendor/reference.py) on the same model and threads, alternating the
two builds round after round so that drift in the machine hits both alike.
Prints a table of prefill (pp) and decode (tg) tokens/s with the ratio, saves
a plot, and rewrites its section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "vendor"))

import benchdoc  # noqa: E402
import reference  # noqa: E402

from llama_sparse import bin_dir, models  # noqa: E402

PLOT = ROOT / "docs" / "img" / "parity.png"


@dataclass
class Row:
    test: str
    upstream: list[float]
    ours: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ours) / statistics.median(self.upstream)


def llama_bench(exe: Path, model: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    cmd = [str(exe), "-m", str(model), "-p", str(args.n_prompt), "-n", str(args.n_gen),
           "-t", str(args.threads), "-r", str(args.reps), "-o", "json"]  # fmt: skip
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {
        (f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"): r["samples_ts"] for r in out
    }


def run(args: argparse.Namespace) -> list[Row]:
    model = models.resolve(args.model)
    builds = {"upstream": reference.build(["llama-bench"]) / "llama-bench",
              "ours": bin_dir() / "llama-bench"}  # fmt: skip
    samples: dict[str, dict[str, list[float]]] = {"upstream": {}, "ours": {}}
    for i in range(args.rounds):
        order = ["upstream", "ours"] if i % 2 == 0 else ["ours", "upstream"]
        for name in order:
            for test, ts in llama_bench(builds[name], model, args).items():
                samples[name].setdefault(test, []).extend(ts)
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
    return [Row(t, samples["upstream"][t], samples["ours"][t]) for t in samples["upstream"]]


def table(rows: list[Row]) -> str:
    lines = [
        "| test | upstream t/s (median) | llama-sparse, off t/s (median) | ratio | samples |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.test} | {statistics.median(r.upstream):.1f} | {statistics.median(r.ours):.1f} "
            f"| {r.ratio:.3f} | {len(r.ours)} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [statistics.median(r.upstream) for r in rows], 0.4,
           label="upstream")  # fmt: skip
    ax.bar([i + 0.2 for i in x], [statistics.median(r.ours) for r in rows], 0.4,
           label="llama-sparse (off)")  # fmt: skip
    for i, r in enumerate(rows):
        top = max(statistics.median(r.upstream), statistics.median(r.ours))
        ax.annotate(f"ratio {r.ratio:.3f}", (i, top), ha="center", va="bottom")
    ax.set_xticks(list(x), [r.test for r in rows])
    ax.set_ylabel("tokens/s (median)")
    ax.margins(y=0.15)
    ax.legend(loc="upper right")
    ax.set_title("Speed parity, same build options and threads")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL, help="model name or GGUF path")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: 5)")
    ap.add_argument("--reps", type=int, default=3, help="llama-bench -r per round (default: 3)")
    ap.add_argument("--threads", type=int, default=2, help="threads (default: 2)")
    ap.add_argument("--n-prompt", type=int, default=128, help="prefill tokens (default: 128)")
    ap.add_argument("--n-gen", type=int, default=64, help="decode tokens (default: 64)")
    ap.add_argument(
        "--no-doc", action="store_true", help="do not touch docs/BENCHMARKS.md or its plot"
    )
    args = ap.parse_args()

    rows = run(args)
    tab = table(rows)
    print(tab)
    if not args.no_doc:
        plot(rows)
        cmd = " ".join(["python scripts/bench_parity.py", *sys.argv[1:]])
        benchdoc.write_section(
            "bench_parity",
            f"Made by `{cmd}` on {benchdoc.machine()}, {args.threads} threads, model "
            f"{args.model}, {args.rounds} alternating rounds of llama-bench -r {args.reps}.\n\n"
            f"{tab}\n\n![parity](img/{PLOT.name})",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
