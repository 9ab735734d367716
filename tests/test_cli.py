"""The llama-sparse command line, as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sysconfig
from pathlib import Path

import pytest

# Real English text that ships with Debian (base-files), not written for us.
LICENSE_TEXT = Path("/usr/share/common-licenses/GPL-3")


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    # the console script pip installed (a pyenv shim may not exist until `pyenv rehash`)
    exe = Path(sysconfig.get_path("scripts")) / "llama-sparse"
    assert exe.is_file(), f"{exe} does not exist: install the package first"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    for cmd in ("run", "models", "server", "bench", "perplexity"):
        assert cmd in proc.stdout


def test_models_lists_and_fetches_default(smollm2: Path) -> None:
    proc = cli("models")
    assert proc.returncode == 0, proc.stderr
    assert "smollm2-135m" in proc.stdout and "(default)" in proc.stdout
    assert str(smollm2) in proc.stdout
    assert cli("models", "--path", "smollm2-135m").stdout.strip() == str(smollm2)


def test_run_generates_with_default_model(smollm2: Path) -> None:
    proc = cli("run", "-n", "16", "-t", "2", "The capital of France is")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The capital of France is")
    assert "Paris" in proc.stdout


@pytest.mark.parametrize(
    "content, expect",
    [
        (None, "model file not found"),
        (b"hello", "is not a GGUF file"),
        (b"GGUF\x03", "cannot load"),
    ],
)
def test_run_bad_model_is_one_clear_line(
    tmp_path: Path, content: bytes | None, expect: str
) -> None:
    model = tmp_path / "bad.gguf"
    if content is not None:
        model.write_bytes(content)
    proc = cli("run", "-m", str(model), "hi")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("llama-sparse: error: ") and expect in lines[0]


def test_unknown_model_name() -> None:
    proc = cli("models", "--path", "no-such-model")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_launchers_run_bundled_tools() -> None:
    for cmd, expect in (("server", "--port"), ("bench", "--n-prompt"), ("perplexity", "--ctx")):
        proc = cli(cmd, "--help")
        assert proc.returncode == 0, (cmd, proc.stderr)
        assert expect in proc.stdout + proc.stderr, cmd


def test_perplexity_launcher_on_real_text(smollm2: Path, tmp_path: Path) -> None:
    text = tmp_path / "gpl3.txt"
    text.write_bytes(LICENSE_TEXT.read_bytes()[:16000])
    proc = cli("perplexity", "-m", str(smollm2), "-f", str(text), "-c", "128", "--chunks", "4",
               "-t", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr)
    assert m, proc.stderr[-2000:]
    assert 1.0 < float(m.group(1)) < 100.0


def test_bench_launcher_measures(smollm2: Path) -> None:
    proc = cli(
        "bench", "-m", str(smollm2), "-p", "16", "-n", "8", "-r", "1", "-t", "2", "-o", "csv"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "avg_ts" in proc.stdout


def test_inspect_dense_and_bad(smollm2: Path, tmp_path: Path) -> None:
    proc = cli("inspect", str(smollm2))
    assert proc.returncode == 0, proc.stderr
    assert "dense GGUF" in proc.stdout
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a model")
    proc = cli("inspect", str(bad))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"llama-sparse: error: {bad} is not a GGUF file"
