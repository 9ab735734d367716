"""What the build ships and how it configures."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from llama_sparse import bin_dir, lib_dir
from llama_sparse.cli import LAUNCHERS

from conftest import ROOT


def test_tools_and_libraries_are_installed() -> None:
    for binary, _ in LAUNCHERS.values():
        assert os.access(bin_dir() / binary, os.X_OK), binary
    for lib in ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so", "libmtmd.so"):
        assert (lib_dir() / lib).is_file(), lib
    assert not list(lib_dir().glob("*.so.*")), "versioned copies of the libraries"


def test_tools_find_their_libraries_without_environment() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    proc = subprocess.run(
        [bin_dir() / "test-backend-ops", "perf", "-o", "ADD", "-b", "CPU"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "1/1 backends passed" in proc.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_build_configures(tmp_path: Path) -> None:
    # CMAKE_ARGS="-DGGML_CUDA=ON" must at least configure on a machine without a GPU
    proc = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-DGGML_CUDA=ON",
         "-DCMAKE_CUDA_ARCHITECTURES=80;86"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CUDA Toolkit found" in proc.stdout
