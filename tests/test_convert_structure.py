"""convert.structure: the sparse GGUF file work, on the real SmolLM2 file."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize

from llama_sparse.convert import structure as st


@pytest.fixture(scope="module")
def dense(smollm2: Path) -> st.DenseModel:
    return st.open_dense(smollm2)


@pytest.fixture(scope="module")
def pruned(dense: st.DenseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every layer keeps a shuffled subset of its neurons (a different size per layer)."""
    rng = np.random.default_rng(0)
    layers = []
    for il, n in enumerate(dense.n_ff):
        keep = rng.permutation(n)[: n - 32 * (il % 3)].astype(np.int32)
        layers.append(st.LayerPlan(keep, rng.random(len(keep)).astype(np.float32)))
    out = tmp_path_factory.mktemp("pruned") / "pruned.gguf"
    return st.write_sparse(dense.path, out, st.SparsePlan(layers), progress=False)


def fields(path: Path) -> dict[str, object]:
    r = GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}


def test_pruned_file_follows_format(dense: st.DenseModel, pruned: Path) -> None:
    r = GGUFReader(pruned)
    t = {x.name: x for x in r.tensors}
    kv = fields(pruned)
    widths = kv["llama.feed_forward_length"]
    assert kv["sparse.format_version"] == 1
    assert kv["sparse.original_ff_length"] == dense.n_ff
    assert kv["sparse.dead_neurons"] == [n - w for n, w in zip(dense.n_ff, widths, strict=True)]
    assert widths[0] == 1536 and widths[1] == 1504 and widths[2] == 1472
    # everything that is not the FFN is untouched
    assert kv["tokenizer.ggml.tokens"] == fields(dense.path)["tokenizer.ggml.tokens"]
    for x in dense.reader.tensors:
        if ".ffn_" not in x.name or x.name.endswith("ffn_norm.weight"):
            np.testing.assert_array_equal(t[x.name].data, x.data)
    for il, w in enumerate(widths):
        assert f"blk.{il}.ffn_down.weight" not in t
        keep = t[f"blk.{il}.ffn_neuron_index"].data
        assert keep.dtype == np.int32 and keep.shape == (w,)
        for m in ("gate", "up"):  # rows are moved as raw bytes: lossless
            dense_rows = dense.tensor(f"blk.{il}.ffn_{m}.weight").data
            np.testing.assert_array_equal(t[f"blk.{il}.ffn_{m}.weight"].data, dense_rows[keep])
        assert list(t[f"blk.{il}.ffn_down_t.weight"].shape) == [576, w]
        assert list(t[f"blk.{il}.ffn_gate_sign"].shape) == [18, w]
        assert t[f"blk.{il}.ffn_down_norm"].data.shape == (w,)


def test_down_t_is_the_transposed_down(dense: st.DenseModel, pruned: Path) -> None:
    t = {x.name: x for x in GGUFReader(pruned).tensors}
    keep = t["blk.3.ffn_neuron_index"].data
    d = dense.tensor("blk.3.ffn_down.weight")
    want = dequantize(d.data, d.tensor_type).reshape(576, -1)[:, keep].T
    got_t = t["blk.3.ffn_down_t.weight"]
    got = dequantize(got_t.data, got_t.tensor_type).reshape(len(keep), 576)
    # Q4_1 requantized along the other axis: close, not equal
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 0.15, rel
    np.testing.assert_allclose(
        t["blk.3.ffn_down_norm"].data, np.linalg.norm(got, axis=1), rtol=1e-5
    )


def test_sign_bits_match_dequantized_gate(dense: st.DenseModel, pruned: Path) -> None:
    t = {x.name: x for x in GGUFReader(pruned).tensors}
    keep = t["blk.5.ffn_neuron_index"].data
    g = dense.tensor("blk.5.ffn_gate.weight")
    neg = dequantize(g.data, g.tensor_type).reshape(-1, 576)[keep] < 0
    words = t["blk.5.ffn_gate_sign"].data.view(np.uint32)
    bits = (words[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1
    np.testing.assert_array_equal(bits.reshape(len(keep), -1)[:, :576].astype(bool), neg)


def test_pack_signs_pads_with_zero_bits() -> None:
    rows = np.array([[-1.0] * 33, [1.0] * 33])
    words = st.pack_signs(rows).view(np.uint32)
    assert words.shape == (2, 2)
    assert words[0].tolist() == [0xFFFFFFFF, 1] and words[1].tolist() == [0, 0]


@pytest.mark.parametrize("qtype", [st.QT.Q4_0, st.QT.Q8_0], ids=lambda t: t.name)
def test_compensated_rounding_lowers_the_product_error(qtype: st.QT) -> None:
    """Rounding each row to nearest is best for the rows; compensating in later rows over
    sampled inputs is better for h @ W, also on inputs it has not seen."""
    rng = np.random.default_rng(1)
    n, d = 256, 64
    w = rng.standard_normal((n, d)).astype(np.float32)
    # inputs near a low-dimensional subspace, as a layer's FFN activations are
    h = rng.standard_normal((4096, 16)) @ rng.standard_normal((16, n))
    h = (h + 0.1 * rng.standard_normal(h.shape)).astype(np.float32)
    seen, unseen = h[:2048], h[2048:]

    def product_error(raw: np.ndarray) -> float:
        back = dequantize(raw, qtype).reshape(n, d)
        return float(np.linalg.norm(unseen @ (back - w)) / np.linalg.norm(unseen @ w))

    plain = st.quantize_rows(w, qtype)
    compensated = st.quantize_rows_compensated(w, qtype, seen)
    assert compensated.shape == plain.shape and compensated.dtype == np.uint8
    assert product_error(compensated) < 0.6 * product_error(plain)
    in_groups = st.quantize_rows_compensated(w, qtype, seen, group=100)
    assert product_error(in_groups) < 0.8 * product_error(plain)
    np.testing.assert_array_equal(
        in_groups[200:], st.quantize_rows_compensated(w[200:], qtype, seen[:, 200:])
    )
    # rows that no input reaches: plain rounding
    np.testing.assert_array_equal(st.quantize_rows_compensated(w, qtype, 0 * seen), plain)
    with pytest.raises(st.ConvertError, match="shape"):
        st.quantize_rows_compensated(w, qtype, seen[:, :10])


def test_down_t_type_choice() -> None:
    assert st.down_t_type(st.QT.Q4_1, 576, None)[0] == st.QT.Q4_1
    assert st.down_t_type(st.QT.F16, 640, None)[0] == st.QT.F16
    # Gemma-3-270M: n_embd 640 is no multiple of the K-quants' 256
    assert st.down_t_type(st.QT.Q6_K, 640, None)[0] == st.QT.Q8_0
    assert st.down_t_type(st.QT.Q4_K, 640, None)[0] == st.QT.Q4_1
    assert st.down_t_type(st.QT.Q4_K, 4096, None)[0] == st.QT.Q4_K


def test_refuses_to_write_over_input(dense: st.DenseModel, tmp_path: Path) -> None:
    plan = st.identity_plan(dense)
    with pytest.raises(st.ConvertError, match="refusing to write over the input"):
        st.write_sparse(dense.path, dense.path, plan, progress=False)
    link = tmp_path / "link.gguf"
    link.symlink_to(dense.path)
    with pytest.raises(st.ConvertError, match="refusing to write over the input"):
        st.write_sparse(dense.path, link, plan, progress=False)
    assert link.resolve() == dense.path


def test_bad_inputs_are_refused(smollm2: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.gguf"
    text.write_text("hello")
    with pytest.raises(st.ConvertError, match="is not a GGUF file"):
        st.open_dense(text)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2.read_bytes()[:100_000])
    with pytest.raises(st.ConvertError, match="truncated or damaged"):
        st.open_dense(cut)
    with pytest.raises(st.ConvertError, match="input not found"):
        st.open_dense(tmp_path / "missing.gguf")
    other = tmp_path / "mamba.gguf"
    w = GGUFWriter(other, "mamba")
    w.add_block_count(1)
    w.add_tensor("blk.0.ssm_in.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(st.ConvertError, match="architecture 'mamba' is not supported"):
        st.open_dense(other)


def test_already_sparse_is_refused(pruned: Path) -> None:
    with pytest.raises(st.ConvertError, match="already a sparse GGUF"):
        st.open_dense(pruned)


def test_failed_write_leaves_nothing(
    dense: st.DenseModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.gguf"
    out.write_bytes(b"an older result")

    def full_disk(self: GGUFWriter, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(st.ConvertError, match="cannot write .*No space left on device"):
        st.write_sparse(dense.path, out, st.identity_plan(dense), progress=False)
    assert out.read_bytes() == b"an older result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_real_full_disk_leaves_nothing(dense: st.DenseModel, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(small)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(st.ConvertError, match="cannot write .* MiB free"):
            st.write_sparse(dense.path, small / "out.gguf", st.identity_plan(dense), progress=False)
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
