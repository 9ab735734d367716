"""A script written for llama-cpp-python runs on llama_sparse by changing its import line.

tests/data/llama_cpp_script.py is an ordinary llama-cpp-python script (greedy and
sampled completion, stop sequences, logprobs, streaming, chat with the model's
template, tokenize/detokenize, a grammar) that prints its results as JSON. It
runs as written on the unpatched upstream build (like tests/parity_probe.py,
through LLAMA_CPP_LIB_PATH), and as a copy whose first line is
`from llama_sparse import Llama` on ours: mode off is upstream bit for bit, so
every text, token and log-probability must be the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llama_sparse import lib_dir

SCRIPT = Path(__file__).parent / "data" / "llama_cpp_script.py"
TEXT = "Tokenizers split text like this: naïve café, 3.14159, and emoji 🙂."  # the script's
ORIGINAL_IMPORT = "from llama_cpp import Llama\n"
SPARSE_IMPORT = "from llama_sparse import Llama\n"


def run_script(script: Path, model: Path, lib: Path | None) -> dict[str, Any]:
    """The script's JSON; `lib`: the libllama directory llama_cpp is pointed at (None: the
    script's own imports decide, as for a user who runs it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB")}
    if lib is not None:
        env["LLAMA_CPP_LIB_PATH"] = str(lib)
    proc = subprocess.run(
        [sys.executable, str(script), str(model)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=script.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.fixture(scope="module")
def sparse_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = SCRIPT.read_text()
    assert text.startswith(ORIGINAL_IMPORT)
    out = tmp_path_factory.mktemp("compat") / "llama_sparse_script.py"
    out.write_text(SPARSE_IMPORT + text[len(ORIGINAL_IMPORT) :])
    return out


@pytest.fixture(scope="module")
def ours(sparse_script: Path, smollm2: Path) -> dict[str, Any]:
    return run_script(sparse_script, smollm2, None)


def check_structure(r: dict[str, Any]) -> None:
    """What any model's results look like, whatever it generated.

    The streamed chat repeats the chat's prompt, so llama-cpp-python keeps the
    cached prompt and evaluates only its last token again, alone: a prompt
    batch and a single token sum in different orders, which can flip a near
    tie for the first word, so the streamed answer need not be the chat's.
    Upstream itself does so with the dense model on an AVX2-only CPU ("La
    femme de France" against "The capital of France is Paris."); a sparse
    file does so on the AVX-512 machine too
    (test_sparse_runtime.py::test_token_by_token_equals_batched)."""
    assert r["n_ctx"] == 512 and r["n_vocab"] > 1000
    assert r["greedy"]["text"].strip()
    assert r["greedy"]["finish_reason"] in ("stop", "length")
    usage = r["greedy"]["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert not any(s in r["greedy"]["text"] for s in (".", "\n"))  # cut at a stop sequence
    lp = r["logprobs"]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 8
    assert "".join(lp["tokens"]) == r["logprobs"]["text"]
    assert all(v <= 0.0 for v in lp["token_logprobs"])
    # greedy: the chosen token is the most likely of the three alternatives
    for tok, lp_tok, top in zip(
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
    ):
        assert len(top) == 3 and lp_tok == max(top.values()) and top[tok] == lp_tok
    assert r["sampled"].strip()
    assert len(r["stream"]["chunks"]) > 5 and r["stream"]["text"].strip()
    assert r["chat"]["role"] == "assistant" and r["chat"]["content"].strip()
    deltas = r["chat_stream"]["deltas"]
    assert deltas[0] == {"role": "assistant"} and len(deltas) > 3
    assert r["chat_stream"]["content"].strip()
    tok = r["tokenize"]
    assert tok["detokenized"] == TEXT
    assert len(tok["special"]) == 2  # the control token is one token, "user" another
    assert r["grammar"] in ("yes", "no")


def test_script_runs_unchanged_on_upstream_and_identically_on_llama_sparse(
    ours: dict[str, Any], smollm2: Path, reference_bin: Path
) -> None:
    ref = run_script(SCRIPT, smollm2, reference_bin)
    assert Path(ref.pop("library")).parent == reference_bin
    assert Path(ours["library"]).parent == lib_dir()
    ours = {k: v for k, v in ours.items() if k != "library"}
    check_structure(ref)
    assert sorted(ours) == sorted(ref)
    for key in ref:
        assert ours[key] == ref[key], key
    # the real model's answers, so that equality is not equality of two failures
    assert any("Paris" in ref[k]["content"] for k in ("chat", "chat_stream"))


def test_script_runs_on_a_sparse_gguf(
    ours: dict[str, Any], sparse_script: Path, sparse_smollm2: Path
) -> None:
    r = run_script(sparse_script, sparse_smollm2, None)
    assert Path(r.pop("library")).parent == lib_dir()
    check_structure(r)
    # the converter keeps the vocabulary and the chat template
    assert r["n_vocab"] == ours["n_vocab"]
    assert r["tokenize"] == ours["tokenize"]
    assert r["chat"]["usage"]["prompt_tokens"] == ours["chat"]["usage"]["prompt_tokens"]
