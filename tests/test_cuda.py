"""The CUDA path, as far as a machine without a GPU can check it (issue 5):
the translation units we add or patch compile for two architectures without
a warning. The kernels' logic is checked by test-backend-ops on the CPU (the
shared rules and tiling of ggml-sparse-common.h) and, on a GPU, by
scripts/gpu-check; the mixed CPU/device split by the RPC test in
test_sparse_runtime.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="the CUDA toolkit (nvcc) is not installed")
def test_cuda_units_compile_without_warnings() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "cuda_check.py"), "--arch", "80,89"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.stdout.count("ok ") == 4, proc.stdout
