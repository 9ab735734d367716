"""The llama-sparse command line, as a user runs it."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sysconfig
from pathlib import Path

import pytest

# Real English text that ships with Debian (base-files), not written for us.
LICENSE_TEXT = Path("/usr/share/common-licenses/GPL-3")


def script(name: str) -> Path:
    # the console script pip installed (a pyenv shim may not exist until `pyenv rehash`)
    exe = Path(sysconfig.get_path("scripts")) / name
    assert exe.is_file(), f"{exe} does not exist: install the package first"
    return exe


def cli(
    *args: str, timeout: float = 300, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script("llama-sparse")), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_commands() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    commands = re.findall(r"^    (\S+)", proc.stdout, re.MULTILINE)
    for cmd in ("chat", "run", "convert", "inspect", "server", "bench", "perplexity", "models"):
        assert cmd in commands, proc.stdout


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
    # llama-sparse-server is `llama-sparse server`: the bundled llama-server with our flags
    proc = subprocess.run(
        [str(script("llama-sparse-server")), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "--port" in proc.stdout and "--sparsity" in proc.stdout


# --- chat ---------------------------------------------------------------------------

CHAT = ("-n", "24", "-t", "2", "--temp", "0")


def test_chat_keeps_the_conversation(smollm2: Path) -> None:
    first, second = "My name is Alice and I live in Paris.", "What is my name?"
    one = cli("chat", *CHAT, stdin=f"{first}\n")
    two = cli("chat", *CHAT, stdin=f"{first}\n{second}\n")
    alone = cli("chat", *CHAT, stdin=f"{second}\n")
    for proc in (one, two, alone):
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "> " not in proc.stdout[:2]  # no prompt when stdin is not a terminal
    # greedy: the first reply is the same with or without a second message
    assert one.stdout.strip() and two.stdout.startswith(one.stdout)
    reply = two.stdout[len(one.stdout) :]
    assert reply.strip()
    # the second reply was written knowing the first exchange
    assert reply != alone.stdout


def test_chat_prompts_on_a_terminal_and_stops_at_exit(smollm2: Path) -> None:
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [str(script("llama-sparse")), "chat", "-n", "4", "-t", "2"],
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(terminal)
    os.write(controller, b"Hello\n/exit\nnever read\n")
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(controller)
    assert proc.returncode == 0, err[-2000:]
    # a prompt before the message and one before /exit, and no reply after it
    assert out.startswith("> ") and out.count("> ") == 2 and out.endswith("> "), out
    assert out[2:-2].strip()


def test_chat_sparsity_on_dense_model_is_one_clear_line(smollm2: Path) -> None:
    proc = cli("chat", "--sparsity", "0.5", stdin="Hello\n")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("llama-sparse: error: ") and "dense GGUF" in lines[0]
    assert proc.stdout == ""


def test_run_at_a_sparsity_level(sparse_smollm2: Path) -> None:
    prompt = "The capital of France is"
    dense = cli("run", "-m", str(sparse_smollm2), "-n", "24", "-t", "2", prompt)
    sparse = cli("run", "-m", str(sparse_smollm2), "-n", "24", "-t", "2", "--sparsity", "0.5",
                 prompt)  # fmt: skip
    for proc in (dense, sparse):
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith(prompt) and len(proc.stdout) > len(prompt) + 10
    assert sparse.stdout != dense.stdout  # half the FFN skipped changes greedy text
    bad = cli("run", "-m", str(sparse_smollm2), "--sparsity", "0.55", prompt)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "not in this model's table" in bad.stderr


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


def test_bench_sweeps_sparsity(sparse_smollm2: Path) -> None:
    """llama-bench takes the sparsity flags as lists, like its other parameters: one test
    per combination, each reporting its values, and fewer FFN rows read at level 0.5."""
    proc = cli("bench", "-m", str(sparse_smollm2), "-p", "0", "-n", "16", "-r", "2", "-t", "2",
               "--sparse-mode", "off,threshold", "--sparsity", "0.5", "-o", "json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(proc.stdout)
    # mode off has no level: it runs once, at 0
    assert [(r["sparse_mode"], r["sparsity"], r["sparse_alpha"]) for r in runs] == [
        ("off", 0.0, 1.0),
        ("threshold", 0.5, 1.0),
    ]
    md = cli("bench", "-m", str(sparse_smollm2), "-p", "0", "-n", "4", "-r", "1", "-t", "2",
             "--sparsity", "0,0.5")  # fmt: skip
    assert md.returncode == 0, md.stderr[-2000:]
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in md.stdout.splitlines()
             if line.startswith("|") and not line.startswith("| --")]  # fmt: skip
    header, rows = table[0], table[1:]
    assert "sparse_mode" not in header  # only the swept parameters are columns
    assert [r[header.index("sparsity")] for r in rows] == ["0", "0.5"]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--sparsity", "0.3,1.5", "--sparsity 1.5 is out of range"),
        ("--sparsity", "0.5x", "--sparsity takes a number, got '0.5x'"),
        ("--sparse-mode", "threshold,fast", "unknown sparse mode 'fast'"),
        ("--sparse-alpha", "0", "--sparse-alpha 0 is out of range"),
    ],
)
def test_bench_refuses_bad_sparsity(sparse_smollm2: Path, flag: str, value: str,
                                    message: str) -> None:  # fmt: skip
    proc = cli("bench", "-m", str(sparse_smollm2), "-p", "0", "-n", "4", flag, value)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_bench_refuses_a_level_the_model_lacks(sparse_smollm2: Path) -> None:
    proc = cli("bench", "-m", str(sparse_smollm2), "-p", "0", "-n", "4", "-r", "1",
               "--sparsity", "0.55")  # fmt: skip
    assert proc.returncode != 0
    assert "not in this model's table" in proc.stderr


def test_inspect_dense_and_bad(smollm2: Path, tmp_path: Path) -> None:
    proc = cli("inspect", str(smollm2))
    assert proc.returncode == 0, proc.stderr
    assert "dense GGUF" in proc.stdout
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a model")
    proc = cli("inspect", str(bad))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"llama-sparse: error: {bad} is not a GGUF file"
