#!/usr/bin/env python3
"""First run on an NVIDIA GPU: build with CUDA, check every sparse op, benchmark.

    python scripts/gpu_check.py [--arch native] [--report gpu-check.md]

Needs the CUDA toolkit and a GPU (nvidia-smi). The sparse CUDA kernels were
written and compiled on machines without a GPU; this script is how they are
first verified:

1. builds this checkout with -DGGML_CUDA=ON in build/gpu (the installed CPU
   package is left alone);
2. runs test-backend-ops for every sparse op on CUDA0 against the CPU (the
   same cases the CPU passes: every weight type, shapes up to a 7B FFN,
   sparsity 0 to 1) and the kernel perf cases beside the dense mat-vec;
3. runs llama-bench (prefill and decode tokens/s) on SmolLM2, dense and
   sparse (the sparse file converted once into the model cache, as
   scripts/bench_sparse.py does), all layers on the GPU and half of them
   (partial offload: CUDA and CPU sparse layers in one model);
4. writes everything into a report (default gpu-check.md) and exits non-zero
   when an op test fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from bench_sparse import sparse_model

from llama_sparse import models

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "gpu"
OPS = [
    "SPARSE_PREDICT",
    "SPARSE_MUL_MAT",
    "SPARSE_MASK",
    "SPARSE_DOWN",
    "SPARSE_FFN",
    "SPARSE_MUL_MAT_PLAIN",
]
SETTINGS = [("dense", None), ("sparse, off", 0.0), ("threshold 0.3", 0.3), ("threshold 0.5", 0.5)]


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})


def build(arch: str) -> None:
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = run(["cmake", "-S", str(ROOT), "-B", str(BUILD), *gen, "-DCMAKE_BUILD_TYPE=Release",
               "-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}"])  # fmt: skip
    if cfg.returncode != 0:
        sys.exit(f"gpu-check: cmake configure failed:\n{cfg.stdout[-3000:]}{cfg.stderr[-3000:]}")
    jobs = str(os.cpu_count() or 2)
    targets = ["test-backend-ops", "llama-bench"]
    out = run(["cmake", "--build", str(BUILD), "-j", jobs, "--target", *targets])
    if out.returncode != 0:
        sys.exit(f"gpu-check: build failed:\n{out.stdout[-5000:]}{out.stderr[-3000:]}")


def op_tests() -> tuple[list[str], bool]:
    rows, ok = [], True
    for op in OPS:
        p = run([str(BUILD / "bin" / "test-backend-ops"), "test", "-b", "CUDA0", "-o", op])
        m = re.search(r"(\d+)/(\d+) tests passed", p.stdout)
        passed = p.returncode == 0 and m is not None and m.group(1) == m.group(2)
        unsupported = p.stdout.count("not supported")
        ok = ok and passed
        fails = [line.strip() for line in p.stdout.splitlines() if "FAIL" in line][:10]
        result = f"{m.group(1)}/{m.group(2)} passed" if m else f"no result (exit {p.returncode})"
        rows.append(f"| {op} | {result} | {unsupported} | {'<br>'.join(fails)} |")
    return rows, ok


def kernel_perf() -> str:
    """The sparse kernels at 7B and 70B FFN shapes, and the dense mat-vec of the same weights."""
    lines = []
    dense = "type_b=f32,m=(11008|28672|4096|8192),n=1,"
    for op, pattern in (("SPARSE_MUL_MAT", ""), ("SPARSE_DOWN", ""), ("MUL_MAT", dense)):
        cmd = [str(BUILD / "bin" / "test-backend-ops"), "perf", "-b", "CUDA0", "-o", op]
        p = run(cmd + (["-p", pattern] if pattern else []))
        lines += [ln.strip() for ln in p.stdout.splitlines() if "us/run" in ln]
    return "\n".join(lines)


def bench(model: Path, level: float | None, ngl: int) -> tuple[float, float]:
    env = {} if level is None else {"LLAMA_ARG_SPARSITY": str(level)}
    cmd = [str(BUILD / "bin" / "llama-bench"), "-m", str(model), "-ngl", str(ngl), "-p", "256",
           "-n", "64", "-r", "3", "-o", "json"]  # fmt: skip
    p = run(cmd, env)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    out = json.loads(p.stdout)
    pp = next(statistics.median(r["samples_ts"]) for r in out if r["n_prompt"])
    tg = next(statistics.median(r["samples_ts"]) for r in out if r["n_gen"])
    return pp, tg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="native", help="CMAKE_CUDA_ARCHITECTURES (default: native)")
    ap.add_argument("--report", type=Path, default=Path("gpu-check.md"), help="report file")
    ap.add_argument("--no-build", action="store_true", help="use build/gpu as it is")
    args = ap.parse_args()

    smi = run(["nvidia-smi", "-L"]) if shutil.which("nvidia-smi") else None
    if smi is None or smi.returncode != 0:
        print("gpu-check: no NVIDIA GPU here (nvidia-smi fails or is missing)")
        return 2
    if not args.no_build:
        build(args.arch)

    op_rows, ok = op_tests()
    dense = models.fetch(models.DEFAULT_MODEL)
    sparse = sparse_model(dense)
    n_layer = 30  # SmolLM2-135M
    speed = []
    for ngl, where in ((99, "all layers on the GPU"), (n_layer // 2, "half the layers")):
        for label, level in SETTINGS:
            pp, tg = bench(dense if level is None else sparse, level, ngl)
            speed.append(f"| {where} | {label} | {pp:.1f} | {tg:.1f} |")

    report = [
        "# gpu-check",
        "",
        "```",
        smi.stdout.strip(),
        "```",
        "",
        "## test-backend-ops, CUDA0 against the CPU",
        "",
        "| op | result | cases not supported (CPU runs them) | failures |",
        "|---|---|---:|---|",
        *op_rows,
        "",
        "## kernels (test-backend-ops perf)",
        "",
        "```",
        kernel_perf(),
        "```",
        "",
        "## SmolLM2-135M, llama-bench (pp 256, tg 64)",
        "",
        "| offload | model | prefill t/s | decode t/s |",
        "|---|---|---:|---:|",
        *speed,
    ]
    args.report.write_text("\n".join(report) + "\n")
    print(f"gpu-check: wrote {args.report}; op tests {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
