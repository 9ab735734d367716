#!/usr/bin/env python3
"""Compile the CUDA translation units llama-sparse adds or patches, without a GPU.

    python scripts/cuda_check.py                 # sm_80 and sm_89
    python scripts/cuda_check.py --arch 86,90

The units are ggml_sparse/ggml-sparse-cuda.cu (our kernels) and upstream's
ggml-cuda.cu as patched by vendor/patches/0006-sparse-cuda-ops.patch, compiled
with ggml-cuda's own nvcc flags. Any error, or any warning located outside the
CUDA toolkit's headers (upstream compiles these units without one), fails the
check. The whole CUDA build is scripts/build-cuda; this is the part CI runs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GGML = ROOT / "vendor" / "llama.cpp" / "ggml"
UNITS = [
    ROOT / "ggml_sparse" / "ggml-sparse-cuda.cu",
    GGML / "src" / "ggml-cuda" / "ggml-cuda.cu",
]
# ggml-cuda's CMakeLists.txt: CUDA_FLAGS and the host warnings of GGML_ALL_WARNINGS
FLAGS = ["-std=c++17", "-O3", "-use_fast_math", "-extended-lambda"]
HOST_FLAGS = "-Wall,-Wextra,-Wno-pedantic,-Wno-unused-function"
DIAGNOSTIC = re.compile(r"^(?P<file>[^\s:(]+)[:(].*\b(?P<kind>error|warning)\b", re.IGNORECASE)


def compile_unit(nvcc: str, unit: Path, arch: str, out_dir: Path) -> tuple[int, str]:
    cmd = [
        nvcc,
        *FLAGS,
        f"-arch=sm_{arch}",
        f"-I{GGML / 'include'}",
        f"-I{GGML / 'src'}",
        f"-I{ROOT / 'ggml_sparse' / 'include'}",
        f"-I{ROOT / 'ggml_sparse'}",
        "-Xcompiler",
        HOST_FLAGS,
        "-c",
        str(unit),
        "-o",
        str(out_dir / f"{unit.stem}.sm_{arch}.o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def problems(output: str, toolkit: Path) -> list[str]:
    """Error and warning lines, except warnings in the CUDA toolkit's own headers."""
    found = []
    for line in output.splitlines():
        m = DIAGNOSTIC.match(line)
        if m is None and "fatal" not in line:
            continue
        if m and m["kind"].lower() == "warning":
            path = Path(m["file"])
            if path.is_absolute() and toolkit in path.resolve().parents:
                continue
        found.append(line)
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="80,89", help="comma-separated sm_ numbers (default 80,89)")
    ap.add_argument("--nvcc", default=os.environ.get("NVCC") or shutil.which("nvcc") or "nvcc")
    args = ap.parse_args()

    if shutil.which(args.nvcc) is None:
        print(f"cuda_check: {args.nvcc} not found (install the CUDA toolkit or set NVCC)")
        return 2
    missing = [u for u in UNITS if not u.exists()]
    if missing:
        print(f"cuda_check: {missing[0]} is missing; run `python vendor/fetch.py` first")
        return 2
    toolkit = Path(shutil.which(args.nvcc) or args.nvcc).resolve().parent.parent

    jobs = [(u, a.strip()) for a in args.arch.split(",") for u in UNITS]
    failed = False
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        results = pool.map(lambda j: compile_unit(args.nvcc, j[0], j[1], Path(tmp)), jobs)
        for (unit, arch), (rc, output) in zip(jobs, results, strict=True):
            bad = problems(output, toolkit)
            name = unit.relative_to(ROOT)
            if rc != 0 or bad:
                failed = True
                print(f"FAIL {name} sm_{arch} (exit {rc})")
                print("\n".join(bad or output.splitlines()[-20:]))
            else:
                print(f"ok   {name} sm_{arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
