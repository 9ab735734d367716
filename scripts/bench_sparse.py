#!/usr/bin/env python3
"""Sparse decoding benchmark: dense vs sparse in one run, with the ideal ratio beside it.

    python scripts/bench_sparse.py [--models smollm2-135m gemma3-270m] [--synthetic q4_0 q4_k]
                                   [--no-kernels]

Three tables, all measured in the same run, same build, same threads:

* kernels: test-backend-ops perf of the skip-row product and the sparse axpy
  over ffn_down_t against ggml's dense mat-vec of the same weight, at 7B and
  70B FFN shapes and sparsity 0.5, 0.7, 0.9 (random masks, the worst case for
  the cache), with the ideal speedup 1/(1-s); and the dense products of a
  128-token prompt batch (mode off prefill) beside ggml's mul_mat;
* end to end: llama-bench decode (tg) and prefill (pp) tokens/s of the dense
  GGUF, the sparse GGUF in mode off, and modes threshold and predict at every
  level the mode reaches, for the real models and synthetic GGUFs with
  Llama-2-7B layer shapes (random weights; their ffn_down_t keeps the input's
  type, as quality does not matter there); beside each, the sparsity the
  context measured on the evaluation text and the ideal decode speedup for it:
  the weight bytes a dense token reads over those the sparse file's token
  reads, its skipped FFN rows removed (a wider ffn_down_t counts against it);
  each sparse run comes between two dense runs, and its speedup is its ratio
  to their mean;
* quality (real models): perplexity, mean KL divergence and top-1 agreement
  against the dense model on the evaluation text (disjoint from calibration).

Sparse files are converted once (default options) into the model cache.
Prints the tables, saves docs/img/sparse.png and rewrites its section of
docs/BENCHMARKS.md (neither with --no-doc).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchdoc
from gguf import GGUFReader

from llama_sparse import Llama, bin_dir, models, quality
from llama_sparse.convert import pipeline, synthetic
from llama_sparse.convert.pipeline import convert
from llama_sparse.convert.text import evaluation_text

ROOT = Path(__file__).resolve().parent.parent
PLOT = ROOT / "docs" / "img" / "sparse.png"


# --- kernels ----------------------------------------------------------------------

PERF_LINE = re.compile(r"^\s*(\w+)\((.*)\):\s+\d+ runs -\s+([0-9.]+) us/run")


def perf(op: str, pattern: str) -> dict[str, float]:
    """us/run of test-backend-ops perf cases of `op` whose parameters match `pattern`."""
    cmd = [str(bin_dir() / "test-backend-ops"), "perf", "-b", "CPU", "-o", op, "-p", pattern]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return {m.group(2): float(m.group(3)) for m in map(PERF_LINE.match, out.splitlines()) if m}


def kernel_table(types: list[str]) -> str:
    lines = [
        "| shape | type | op | dense us | s | sparse us | speedup | ideal | of ideal |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n_embd, n_ff, label in ((4096, 11008, "7B"), (8192, 28672, "70B")):
        for t in types:
            dense = perf("MUL_MAT", f"type_a={t},type_b=f32,m=(11008|28672|4096|8192),n=1,")
            gate = next(v for k, v in dense.items() if f"m={n_ff},n=1,k={n_embd}," in k)
            down = next(v for k, v in dense.items() if f"m={n_embd},n=1,k={n_ff}," in k)
            for op, base, name in (
                ("SPARSE_MUL_MAT", gate, "gate/up"),
                ("SPARSE_DOWN", down, "down_t"),
            ):
                sparse = perf(op, f"type={t},n_embd={n_embd},n_ff={n_ff},n_tok=1,")
                for s in (0.5, 0.7, 0.9):
                    us = next(v for k, v in sparse.items() if f"sparsity={s:.6f}" in k)
                    ideal = 1 / (1 - s)
                    lines.append(
                        f"| {label} {n_embd}x{n_ff} | {t} | {name} | {base:.0f} | {s} | {us:.0f} "
                        f"| {base / us:.2f} | {ideal:.2f} | {base / us / ideal:.0%} |"
                    )
            print(f"kernels {label} {t} done", file=sys.stderr)
    return "\n".join(lines)


def prefill_kernel_table(types: list[str]) -> str:
    """A prompt batch of 128 tokens at the 7B shape, every row: the dense products mode off
    computes for a sparse layer, beside ggml's mul_mat on the same (plain) layout."""
    lines = [
        "| type | ggml mul_mat us | gate/up (hinted mul_mat) us | down_t (axpy) us |",
        "|---|---:|---:|---:|",
    ]
    for t in types:
        dense = perf("MUL_MAT", f"type_a={t},type_b=f32,m=11008,n=128,k=4096,")
        plain = perf("SPARSE_MUL_MAT_PLAIN", f"type={t},n_embd=4096,n_ff=11008,n_tok=128")
        down = perf("SPARSE_DOWN", f"type={t},n_embd=4096,n_ff=11008,n_tok=128,")
        (d,), (g,), (a,) = dense.values(), plain.values(), down.values()
        lines.append(f"| {t} | {d:.0f} | {g:.0f} | {a:.0f} |")
    return "\n".join(lines)


# --- end to end -------------------------------------------------------------------


@dataclass
class Setting:
    mode: str
    level: float
    pp: float = 0.0
    tg: float = 0.0
    pp_ratio: float = 1.0  # against the dense runs on either side, median over the rounds
    tg_ratio: float = 1.0
    achieved: float | None = None
    ideal: float | None = None
    quality: quality.Quality | None = None

    @property
    def label(self) -> str:
        return self.mode if self.mode in ("dense", "off") else f"{self.mode} {self.level:g}"

    def env(self) -> dict[str, str]:
        if self.mode == "dense":
            return {}
        return {"LLAMA_ARG_SPARSE_MODE": self.mode, "LLAMA_ARG_SPARSITY": str(self.level)}

    def flags(self) -> tuple[str, ...]:
        if self.mode == "dense":
            return ()
        return ("--sparse-mode", self.mode, "--sparsity", str(self.level))


@dataclass
class ModelRun:
    name: str
    dense: Path
    sparse: Path
    synthetic: bool
    settings: list[Setting] = field(default_factory=list)


def llama_bench(model: Path, s: Setting, args: argparse.Namespace) -> tuple[float, float]:
    """One llama-bench repetition of `s`: prefill and decode tokens/s."""
    cmd = [str(bin_dir() / "llama-bench"), "-m", str(model), "-p", str(args.n_prompt),
           "-n", str(args.n_gen), "-t", str(args.threads), "-r", "1", "-o", "json"]  # fmt: skip
    env = {**os.environ, **s.env()}
    out = json.loads(
        subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    )
    pp = next(r["avg_ts"] for r in out if r["n_prompt"])
    tg = next(r["avg_ts"] for r in out if r["n_gen"])
    return pp, tg


def measure_speeds(m: ModelRun, args: argparse.Namespace) -> None:
    """Tokens/s of each setting, and its ratio to the dense model, over args.reps rounds.

    A round runs dense, the first sparse setting, dense, the second, ..., dense: each setting's
    ratio is taken against the mean of the two dense runs beside it, so that a slow spell of
    this shared machine lands on both sides of a ratio instead of on whichever settings it hits.
    It does not remove the spread between single processes (docs/BENCHMARKS.md), which only
    more rounds average out. Reported: the median ratio and the median tokens/s over the
    rounds."""
    dense, *sparse = m.settings
    runs: list[list[tuple[float, float]]] = [[] for _ in m.settings]
    ratios: list[list[tuple[float, float]]] = [[] for _ in sparse]
    for r in range(args.reps):
        before = llama_bench(m.dense, dense, args)
        runs[0].append(before)
        for s, got, ratio in zip(sparse, runs[1:], ratios, strict=True):
            pp, tg = llama_bench(m.sparse, s, args)
            after = llama_bench(m.dense, dense, args)
            got.append((pp, tg))
            runs[0].append(after)
            ratio.append((2 * pp / (before[0] + after[0]), 2 * tg / (before[1] + after[1])))
            before = after
        print(f"{m.name}: speed round {r + 1}/{args.reps} done", file=sys.stderr)
    for s, got in zip(m.settings, runs, strict=True):
        s.pp = statistics.median(pp for pp, _ in got)
        s.tg = statistics.median(tg for _, tg in got)
    for s, ratio in zip(sparse, ratios, strict=True):
        s.pp_ratio = statistics.median(pp for pp, _ in ratio)
        s.tg_ratio = statistics.median(tg for _, tg in ratio)


def weight_bytes(path: Path) -> tuple[float, float, float]:
    """Bytes a decoded token reads: all weights but the sign bits and the embedding table (one
    row; unless the output projection is tied to it); of those, the FFN's; and the sign bits
    (read in mode predict only)."""
    tensors = GGUFReader(path).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    total = ffn = signs = 0.0
    for t in tensors:
        if (t.name == "token_embd.weight" and not tied) or len(t.shape) < 2:
            continue
        if t.name.endswith(".ffn_gate_sign"):
            signs += t.n_bytes
            continue
        total += t.n_bytes
        if re.search(r"ffn_(gate|up|down_t)\.weight$", t.name):
            ffn += t.n_bytes
    return total, ffn, signs


def measure_sparsity(model: Path, s: Setting, tokens: list[int], threads: int) -> float:
    llm = Llama(model_path=str(model), n_ctx=1024, n_batch=256, n_threads=threads, verbose=False,
                sparse_mode=s.mode, sparsity=s.level)  # fmt: skip
    llm.eval(tokens)
    sparsity = llm.sparse_stats()["sparsity"]
    llm.close()
    return float(sparsity) if sparsity is not None else 0.0


def reachable(model: Path) -> dict[str, list[float]]:
    """Levels each sparse mode reaches on the model (the table's achieved key)."""
    r = GGUFReader(model)

    def arr(key: str) -> list[float]:
        return [float(v) for v in r.fields[key].contents()]

    levels = [round(lv, 4) for lv in arr("sparse.levels")]
    return {
        mode: [
            lv
            for lv, a in zip(levels, arr(f"sparse.{mode}.achieved"), strict=True)
            if a >= lv - 0.01
        ]
        for mode in ("threshold", "predict")
    }


def converter_hash() -> str:
    """Digest of the installed converter's sources (reinstalling does not change it)."""
    h = hashlib.sha256()
    for f in sorted(Path(pipeline.__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()


def converted(sparse: Path) -> bool:
    """A cached sparse file exists and was made by the installed converter."""
    stamp = sparse.with_suffix(".converter")
    return sparse.exists() and stamp.exists() and stamp.read_text() == converter_hash()


def convert_cached(dense: Path, sparse: Path, **kwargs: Any) -> None:
    """convert(), then record which converter made the file."""
    convert(dense, sparse, **kwargs)
    sparse.with_suffix(".converter").write_text(converter_hash())


def sparse_model(dense: Path, threads: int | None = None) -> Path:
    """The sparse GGUF of `dense`, converted with the default options and cached beside the
    known models (scripts/bench_server.py serves it too) until the converter changes."""
    sparse = models.model_dir() / "sparse" / f"{dense.stem}.sparse.gguf"
    if not converted(sparse):
        sparse.parent.mkdir(parents=True, exist_ok=True)
        convert_cached(dense, sparse, threads=threads)
    return sparse


def prepare(args: argparse.Namespace, tmp: Path) -> list[ModelRun]:
    cache = models.model_dir() / "sparse"
    cache.mkdir(parents=True, exist_ok=True)
    runs = []
    for name in args.models:
        dense = models.resolve(name)
        runs.append(ModelRun(name, dense, sparse_model(dense, args.threads), synthetic=False))
    for qt in args.synthetic:
        dense = cache / f"synthetic-7b-{args.syn_layers}l-{qt}.gguf"
        sparse = cache / f"synthetic-7b-{args.syn_layers}l-{qt}.same-down.sparse.gguf"
        qtype = synthetic.QT[qt.upper()]
        if not dense.exists():
            shape = synthetic.SHAPES["llama2-7b"]
            tokenizer = models.fetch(models.DEFAULT_MODEL)
            synthetic.write_synthetic(dense, tokenizer, shape, n_layer=args.syn_layers, qtype=qtype)
        if not converted(sparse):
            # speed only: ffn_down_t in the dense model's type, whatever requantizing it costs
            convert_cached(dense, sparse, n_tokens=2048, threads=args.threads, down_type=qtype)
        runs.append(
            ModelRun(f"synthetic 7B {qt} ({args.syn_layers} layers)", dense, sparse, synthetic=True)
        )
    return runs


def run_model(m: ModelRun, args: argparse.Namespace, eval_file: Path) -> None:
    reach = reachable(m.sparse)
    m.settings = [Setting("dense", 0.0), Setting("off", 0.0)]
    for mode in ("threshold", "predict"):
        m.settings += [Setting(mode, lv) for lv in reach[mode] if round(lv, 4) in args.levels]
    dense_total = weight_bytes(m.dense)[0]
    total, ffn, signs = weight_bytes(m.sparse)
    llm = Llama(model_path=str(m.sparse), n_ctx=64, verbose=False)
    tokens = llm.tokenize(eval_file.read_text()[:6000].encode())[:768]
    llm.close()
    measure_speeds(m, args)
    for s in m.settings:
        if s.mode == "off":
            s.ideal = dense_total / total
        elif s.mode != "dense":
            s.achieved = measure_sparsity(m.sparse, s, tokens, args.threads)
            read = total + (signs if s.mode == "predict" else 0.0) - s.achieved * ffn
            s.ideal = dense_total / read
        print(f"{m.name} {s.label}: pp {s.pp:.1f} tg {s.tg:.1f} t/s", file=sys.stderr)
    if not m.synthetic:
        sparse = [s for s in m.settings if s.mode != "dense"]
        results = quality.compare_runs(m.dense, [(m.sparse, s.flags()) for s in sparse], eval_file,
                                       ctx=args.ctx, threads=args.threads)  # fmt: skip
        for s, q in zip(sparse, results, strict=True):
            s.quality = q


def speed_table(m: ModelRun) -> str:
    lines = [
        "| setting | sparsity measured | pp t/s | pp vs dense | tg t/s | tg speedup | ideal "
        "| of ideal speed | of ideal gain | PPL | mean KLD | top-1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in m.settings:
        up = s.tg_ratio
        gain = f"{(up - 1) / (s.ideal - 1):.0%}" if s.ideal and s.ideal > 1.001 else ""
        q = s.quality
        qcols = (
            f"{q.ppl:.3f} ({q.ppl_change:+.1%}) | {q.mean_kld:.4f} | {q.top1:.1%}" if q else "| |"
        )
        achieved = "" if s.achieved is None else f"{s.achieved:.3f}"
        ideal = "" if s.ideal is None else f"{s.ideal:.2f}"
        of_speed = "" if s.ideal is None else f"{up / s.ideal:.0%}"
        lines.append(
            f"| {s.label} | {achieved} | {s.pp:.1f} | {s.pp_ratio:.2f} | {s.tg:.1f} | {up:.2f} "
            f"| {ideal} | {of_speed} | {gain} | {qcols} |"
        )
    return "\n".join(lines)


def plot(runs: list[ModelRun]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, m in zip(axes[0], runs, strict=True):
        for mode, marker in (("threshold", "o"), ("predict", "s")):
            pts = [s for s in m.settings if s.mode == mode]
            ax.plot([s.achieved for s in pts], [s.tg_ratio for s in pts], marker=marker, label=mode)
            ax.plot([s.achieved for s in pts], [s.ideal for s in pts], ls=":", color="gray")
        ax.axhline(1.0, color="black", lw=0.5)
        ax.set_xlabel("FFN byte sparsity measured")
        ax.set_ylabel("decode speedup over dense")
        ax.set_title(m.name, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("dotted: ideal speedup for the measured sparsity", fontsize=9)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=100)


def cache_note() -> str:
    """Which of the kernel table's Q4_0 matrices fit this CPU's L3, as sysfs reports it."""
    sizes = {"7B": 4096 * 11008 * 18 // 32, "70B": 8192 * 28672 * 18 // 32}
    mats = f"a 7B Q4_0 matrix is {sizes['7B'] / 1e6:.0f} MB, a 70B one {sizes['70B'] / 1e6:.0f} MB"
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        l3 = int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]]
    except (OSError, ValueError, KeyError, IndexError):
        return f"{mats}; the L3 size is unknown"
    fit = [k for k, v in sizes.items() if v <= l3]
    fits = " and ".join(fit) + (" fit" if len(fit) > 1 else " fits") if fit else "neither fits"
    return f"{mats}; the L3 sysfs reports (on a VM possibly the host's) is {l3 >> 20} MiB: {fits}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models", nargs="*", default=["smollm2-135m", "gemma3-270m"], help="real models"
    )
    ap.add_argument("--synthetic", nargs="*", default=["q4_0", "q4_k"], help="synthetic 7B types")
    ap.add_argument("--syn-layers", type=int, default=8, help="synthetic model layers (default: 8)")
    ap.add_argument("--levels", type=float, nargs="*", default=[0.1, 0.3, 0.5, 0.6, 0.7, 0.9])
    ap.add_argument("--kernel-types", nargs="*", default=["q4_0", "q4_K", "q5_0", "q8_0", "f16"])
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernel table")
    ap.add_argument("--threads", type=int, default=2, help="threads (default: 2)")
    ap.add_argument(
        "--reps",
        type=int,
        default=3,
        help="speed rounds, each running every setting once between two dense runs (default: 3)",
    )
    ap.add_argument("--n-prompt", type=int, default=128, help="prefill tokens (default: 128)")
    ap.add_argument("--n-gen", type=int, default=64, help="decode tokens (default: 64)")
    ap.add_argument("--ctx", type=int, default=512, help="perplexity context (default: 512)")
    ap.add_argument("--eval-chars", type=int, default=20000, help="evaluation text length")
    ap.add_argument(
        "--no-doc", action="store_true", help="do not touch docs/BENCHMARKS.md or its plot"
    )
    args = ap.parse_args()

    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        text, source = evaluation_text()
        eval_file = Path(tmp) / "eval.txt"
        eval_file.write_text(text[: args.eval_chars])
        runs = prepare(args, Path(tmp))
        for m in runs:
            run_model(m, args, eval_file)
            tab = speed_table(m)
            print(f"\n{m.name}\n{tab}")
            what = "synthetic, random weights: speed only" if m.synthetic else "real model"
            parts.append(f"**{m.name}** ({what}):\n\n{tab}")
    if not args.no_doc:
        plot(runs)
    if not args.no_kernels:
        ktab = kernel_table(args.kernel_types)
        print(f"\nkernels\n{ktab}")
        # test-backend-ops gives the CPU backend half the cores
        threads = max(1, (os.cpu_count() or 2) // 2)
        parts.append(
            f"Kernels, {threads} thread(s) (test-backend-ops perf: half the cores), random masks, "
            f"the same mask every run: {cache_note()}:\n\n{ktab}"
        )
        ptab = prefill_kernel_table(["q4_0", "q4_K", "q8_0"])
        print(f"\nprefill kernels\n{ptab}")
        parts.append(
            f"Prefill kernels, {threads} thread(s): a batch of 128 tokens through a 7B FFN matrix, "
            "every row, as mode `off` computes a prompt. Gate and up go through ggml's `mul_mat` "
            "hinted that the weight is not repacked (`ggml_sparse_mul_mat_plain`: Q4_0 through "
            "ggml's repacked GEMM on tiles interleaved on the fly; other types are ggml's own), "
            f"down through the axpy over `ffn_down_t`:\n\n{ptab}"
        )
    if not args.no_doc:
        cmd = " ".join(["python scripts/bench_sparse.py", *sys.argv[1:]])
        head = (
            f"Made by `{cmd}` on {benchdoc.machine()}, {args.threads} threads; llama-bench pp"
            f"{args.n_prompt} / tg{args.n_gen}, {args.reps} rounds that each run every setting "
            "once, in turn, with a dense run before and after each: t/s is the median over the "
            "rounds, a ratio (pp vs dense, tg speedup) the median of each run's ratio to the mean "
            "of the two dense runs beside it; sparsity measured and quality on "
            f"{args.eval_chars} characters of {source}, context {args.ctx}."
        )
        benchdoc.write_section(
            "bench_sparse", "\n\n".join([head, *parts, f"![sparse](img/{PLOT.name})"])
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except quality.QualityError as e:  # e.g. an --eval-chars too short for --ctx
        sys.exit(f"bench_sparse: {e}")
