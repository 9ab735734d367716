"""`llama-sparse convert` end to end on the real SmolLM2, and its refusals."""

from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from llama_sparse.convert import pipeline, structure
from llama_sparse.convert.inspect import summary


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sysconfig.get_path("scripts")) / "llama-sparse"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def converted(sparse_smollm2: Path) -> Path:
    return sparse_smollm2


def test_converted_file_has_tables_and_hot_first_order(converted: Path) -> None:
    r = GGUFReader(converted)
    kv = {k: f.contents() for k, f in r.fields.items()}
    n_layer = 30
    levels = kv["sparse.levels"]
    assert levels == pytest.approx([0.1 * i for i in range(1, 10)])
    for key in ("sparse.threshold.gate", "sparse.threshold.up", "sparse.predict.alpha",
                "sparse.predict.gate", "sparse.predict.up"):  # fmt: skip
        assert len(kv[key]) == len(levels) * n_layer, key
    assert len(kv["sparse.predictor.alpha"]) == n_layer
    assert kv["sparse.allocation"] == "uniform"
    assert kv["sparse.calibration.tokens"] == 2048
    assert "pydoc_data" in kv["sparse.calibration.source"]
    # thresholds grow with the level
    gate = np.array(kv["sparse.threshold.gate"]).reshape(len(levels), n_layer)
    assert (np.diff(gate.sum(axis=1)) >= 0).all()
    dead = kv["sparse.dead_neurons"]
    assert sum(dead) > 0
    widths = kv["llama.feed_forward_length"]
    assert [w + d for w, d in zip(widths, dead, strict=True)] == [1536] * n_layer
    assert "levels         0.1, 0.2" in summary(converted)
    # Q4_1 down rows requantized along n_embd: kept only if that costs <= 0.5 % perplexity
    assert kv["sparse.down_t.ppl_change"] <= 0.005
    assert kv["sparse.down_t.reason"].startswith(("Q4_1, requantized", "Q8_0: requantized", "F16"))


def test_bad_options_are_refused(smollm2: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    for args, expect in (
        (["--levels", "0.5,0.3"], "levels must be increasing"),
        (["--levels", "0.5,1.2"], "levels must be increasing and in (0, 1)"),
        (["--tokens", "0"], "must be a positive integer"),
        (["--dead-tolerance", "-1"], "must be a number >= 0"),
    ):
        proc = cli("convert", str(smollm2), str(out), *args)
        assert proc.returncode == 2 and expect in proc.stderr, (args, proc.stderr)
    assert not out.exists()


def test_bad_inputs_are_one_clear_line(smollm2: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("text")
    for src, dst, expect in (
        (text, tmp_path / "o.gguf", "is not a GGUF file"),
        (tmp_path / "missing.gguf", tmp_path / "o.gguf", "input not found"),
        (smollm2, smollm2, "refusing to write over the input"),
    ):
        proc = cli("convert", str(src), str(dst))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert expect in lines[0]
    assert structure.open_dense(smollm2)  # the input is untouched


def test_dead_mask_is_relative_to_the_layer(smollm2: Path) -> None:
    class Stats:  # the two fields dead_mask reads
        h_absmean = [np.array([1.0, 1.0, 1.0, 0.0])]
        down_norm = [np.array([1.0, 1.0, 1.0, 1.0])]

        def score3_max(self, il: int) -> np.ndarray:
            return np.array([2.0, 0.5, 0.01, 0.0])

    mask = pipeline.dead_mask(Stats(), 0, 0.05)  # type: ignore[arg-type]
    assert mask.tolist() == [False, False, True, True]


def test_converted_model_runs(converted: Path) -> None:
    from llama_sparse import Llama

    llm = Llama(model_path=str(converted), n_ctx=256, n_threads=2, verbose=False)
    assert llm.is_sparse
    out = llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0)
    assert "Paris" in out["choices"][0]["text"]


def layer_sparsity(model: Path, level: float) -> np.ndarray:
    """Per-layer byte sparsity mode threshold reaches at `level` on evaluation text."""
    from llama_sparse import Llama
    from llama_sparse.convert.text import evaluation_text

    llm = Llama(model_path=str(model), n_ctx=1024, n_batch=256, n_threads=2, verbose=False,
                sparse_mode="threshold", sparsity=level)  # fmt: skip
    llm.eval(llm.tokenize(evaluation_text()[0][:4000].encode())[:512])
    layers = np.array(llm.sparse_stats()["layers"])
    llm.close()
    return layers


def test_cats_allocation_thresholds_plain_gate(smollm2: Path, tmp_path: Path) -> None:
    """--allocation cats: point 2 alone, on plain |act(g)|, the same share in every
    layer; the runtime follows it through ffn_up_absmean = 1 / ffn_down_norm."""
    out = tmp_path / "cats.gguf"
    proc = cli("convert", str(smollm2), str(out), "--allocation", "cats", "--tokens", "2048",
               "--down-type", "q8_0", "-t", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "levels (cats allocation)" in proc.stdout
    r = GGUFReader(out)
    assert r.fields["sparse.allocation"].contents() == "cats"
    assert not np.any(r.fields["sparse.threshold.up"].contents())
    t = {t.name: np.asarray(t.data) for t in r.tensors}
    for il in (0, 29):
        norm, absmean = t[f"blk.{il}.ffn_down_norm"], t[f"blk.{il}.ffn_up_absmean"]
        np.testing.assert_allclose(absmean * norm, 1.0, rtol=1e-6)
    # thresholds in units of |act(g)| meet the level only if the runtime's score is |act(g)|
    cats = layer_sparsity(out, 0.5)
    assert abs(cats.mean() - 0.5) < 0.1, cats
    # the same share in every layer, within the text's noise
    assert cats.std() < 0.03, cats
