"""llama_sparse.Llama: llama-cpp-python's Llama on our library, on a real model."""

from __future__ import annotations

from pathlib import Path

import pytest

import llama_sparse
from llama_sparse import Llama, lib_dir

from conftest import load_error


@pytest.fixture(scope="module")
def llm(smollm2: Path) -> Llama:
    return Llama(model_path=str(smollm2), n_ctx=512, n_threads=2, seed=0, verbose=False)


def test_runs_on_our_library(llm: Llama) -> None:
    import llama_cpp

    assert Path(llama_cpp.llama_cpp._lib._name).parent == lib_dir()
    assert isinstance(llm, llama_cpp.Llama)
    assert llama_sparse._binding.llama_sparse_version() == llama_sparse.__version__.encode()


def test_greedy_completion_is_coherent(llm: Llama) -> None:
    out = llm.create_completion("The capital of France is", max_tokens=16, temperature=0.0)
    assert "Paris" in out["choices"][0]["text"]


def test_dense_model_is_not_sparse(llm: Llama) -> None:
    assert llm.is_sparse is False


def truncated(src: Path, dst: Path, size: int) -> Path:
    with src.open("rb") as f:
        dst.write_bytes(f.read(size))
    return dst


def test_missing_file(tmp_path: Path) -> None:
    assert load_error(tmp_path / "nope.gguf") == f"model file not found: {tmp_path / 'nope.gguf'}"


def test_not_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "notes.gguf"
    bad.write_text("just some text\n")
    assert "is not a GGUF file" in load_error(bad)


def test_empty_file(tmp_path: Path) -> None:
    bad = tmp_path / "empty.gguf"
    bad.touch()
    assert "is not a GGUF file" in load_error(bad)


def test_truncated_in_tensor_data(smollm2: Path, tmp_path: Path) -> None:
    bad = truncated(smollm2, tmp_path / "half.gguf", smollm2.stat().st_size // 2)
    msg = load_error(bad)
    assert msg.startswith(f"cannot load {bad}: ")
    assert "data is not within the file bounds" in msg, msg


def test_truncated_in_header(smollm2: Path, tmp_path: Path) -> None:
    bad = truncated(smollm2, tmp_path / "head.gguf", 4096)
    msg = load_error(bad)
    assert msg.startswith(f"cannot load {bad}: "), msg
    assert msg.endswith("(the GGUF file is truncated or damaged)"), msg
