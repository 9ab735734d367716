"""Mode off is upstream: same greedy tokens and bit-identical logits as an unpatched build."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from llama_sparse import lib_dir

from parity_probe import PROMPTS

PROBE = Path(__file__).with_name("parity_probe.py")


def probe(lib: Path, model: Path, out: Path) -> dict[str, np.ndarray]:
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib))
    subprocess.run([sys.executable, str(PROBE), str(model), str(out)], check=True, env=env)
    with np.load(out) as f:
        return dict(f)


def test_builds_differ(reference_bin: Path) -> None:
    # guards the parity test against comparing a library with itself
    assert hasattr(ctypes.CDLL(str(lib_dir() / "libllama.so")), "llama_sparse_version")
    assert not hasattr(ctypes.CDLL(str(reference_bin / "libllama.so")), "llama_sparse_version")


def test_greedy_tokens_and_logits_match_upstream(
    smollm2: Path, reference_bin: Path, tmp_path: Path
) -> None:
    ours = probe(lib_dir(), smollm2, tmp_path / "ours.npz")
    ref = probe(reference_bin, smollm2, tmp_path / "ref.npz")
    assert Path(str(ours["lib"])).parent == lib_dir()
    assert Path(str(ref["lib"])).parent == reference_bin
    for i in range(len(PROMPTS)):
        assert len(ours[f"tokens_{i}"]) == 64
        np.testing.assert_array_equal(ours[f"tokens_{i}"], ref[f"tokens_{i}"])
        a, b = ours[f"logits_{i}"], ref[f"logits_{i}"]
        assert a.dtype == np.float32 and np.isfinite(a).all()
        assert a.tobytes() == b.tobytes(), f"prompt {i}: first-step logits differ"
        np.testing.assert_array_equal(ours[f"hashes_{i}"], ref[f"hashes_{i}"])
