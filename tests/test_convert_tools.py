"""convert.inspect and convert.synthetic on real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from llama_sparse import Llama
from llama_sparse.convert import inspect, structure, synthetic

TINY = synthetic.Shape("tiny", n_embd=256, n_ff=768, n_head=4, n_head_kv=2)


def test_inspect_says_dense(smollm2: Path) -> None:
    text = inspect.summary(smollm2)
    assert text.startswith(f"{smollm2}: dense GGUF (llama, ")
    assert "llama-sparse convert" in text


def test_inspect_summarises_sparse(smollm2: Path, tmp_path: Path) -> None:
    dense = structure.open_dense(smollm2)
    plan = structure.identity_plan(dense)
    plan.layers[0] = structure.LayerPlan(
        plan.layers[0].keep[:1000], plan.layers[0].up_absmean[:1000]
    )
    out = structure.write_sparse(smollm2, tmp_path / "s.gguf", plan, progress=False)
    text = inspect.summary(out)
    assert "sparse GGUF, format version 1" in text
    assert "      0   1000 / 1536   34.9%" in text
    assert "dead neurons   536 of 46080 (1.16%)" in text
    assert "levels         none" in text


def test_inspect_refuses_non_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_text("nope")
    with pytest.raises(structure.ConvertError, match="not a GGUF file"):
        inspect.summary(bad)


def test_synthetic_model_runs_and_says_what_it_is(smollm2: Path, tmp_path: Path) -> None:
    out = synthetic.write_synthetic(tmp_path / "tiny.gguf", smollm2, TINY, progress=False)
    r = GGUFReader(out)
    assert "random weights" in r.fields["general.name"].contents()
    shapes = {t.name: list(t.shape) for t in r.tensors}
    assert shapes["blk.1.ffn_gate.weight"] == [256, 768]
    assert shapes["blk.1.ffn_down.weight"] == [768, 256]
    llm = Llama(model_path=str(out), n_ctx=64, n_threads=2, verbose=False)
    toks = llm.tokenize(b"Hello world")
    llm.eval(toks)
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    assert np.isfinite(logits).all() and logits.std() > 0
