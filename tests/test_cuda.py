"""The CUDA path, as far as a machine without a GPU can check it (issue 5):
the translation units we add or patch compile for two architectures without
a warning. The kernels' logic is checked by test-backend-ops on the CPU (the
shared rules and tiling of ggml-sparse-common.h) and, on a GPU, by
scripts/gpu-check; the mixed CPU/device split by the RPC test in
test_sparse_runtime.py."""

from __future__ import annotations

import re
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


def test_supports_op_answers(tmp_path: Path) -> None:
    """The CUDA backend's supports_op for the sparse ops, as the model loader asks
    it (host code, no GPU): every sparse op on the weight types GGUF models ship
    with, except the sparse axpy on K-quants, which stays on the CPU; and no
    quantized type without a mat-vec dot product in upstream ggml-cuda."""
    from llama_sparse import lib_dir

    exe = tmp_path / "supports"
    ggml = ROOT / "vendor" / "llama.cpp" / "ggml"
    subprocess.run(
        ["c++", "-std=c++17", "-Wall", "-Wextra", "-Werror", str(ROOT / "tests/cuda/supports.cpp"),
         f"-I{ggml / 'include'}", f"-I{ROOT / 'ggml_sparse/include'}", f"-I{ROOT / 'ggml_sparse'}",
         f"-L{lib_dir()}", "-lggml-base", f"-Wl,-rpath,{lib_dir()}", "-o", str(exe)],
        check=True,
    )  # fmt: skip
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    answers = {(op, t): yes == "1" for op, t, yes in map(str.split, out.splitlines())}

    assert answers["SPARSE_PREDICT", "-"] and answers["SPARSE_MASK", "-"]
    shipped = ["f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
    k_quants = ["q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "iq4_nl", "iq4_xs"]
    for t in shipped + k_quants:
        assert answers["SPARSE_MUL_MAT", t], t
    for t in shipped:
        assert answers["SPARSE_DOWN", t], t
    for t in k_quants:
        assert not answers["SPARSE_DOWN", t], t  # dequantized by whole blocks: the CPU's
    for t in ("q8_1", "q8_K", "i32", "f64"):  # activation and integer types are no weights
        assert not answers["SPARSE_MUL_MAT", t] and not answers["SPARSE_DOWN", t], t

    # a quantized type it takes has a dot product in upstream's mmvq (get_vec_dot_q_cuda)
    mmvq = (ggml / "src" / "ggml-cuda" / "mmvq.cu").read_text()
    has_dot = {m.lower() for m in re.findall(r"case GGML_TYPE_(\w+):\s+return vec_dot_", mmvq)}
    taken = {t.lower() for (op, t), yes in answers.items() if op == "SPARSE_MUL_MAT" and yes}
    assert taken - {"f32", "f16", "bf16"} <= has_dot, taken - has_dot
