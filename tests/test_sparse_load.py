"""Sparse GGUF files (docs/FORMAT.md) load and run densely (mode `off`).

Numbers behind the tolerances (SmolLM2-135M Q4_1, 53 teacher-forced positions):
the dense model quantizes the input of every Q4_1 mat-mul to Q8_1, so any change
of rounding in one layer flips Q8_1 roundings in the next ones. Multiplying the
dense ffn_down by (1 + 1e-6 noise) already moves the logits by up to 1.06 (mean
0.13) and changes the top token at 2 % of the positions; the identity sparse file
with an F32 ffn_down_t moves them by up to 1.5 (mean 0.17 to 0.23) and changes the
top token at up to 3 of 36 positions, all near ties. A wrong down projection (Q4_1
requantized ffn_down_t: mean 1.4, top-1 92 %; a transposition error: garbage) is
far outside.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from llama_sparse import Llama
from llama_sparse.convert import structure as st
from llama_sparse.convert.structure import copy_field

from conftest import load_error

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
N_GEN = 32


# --- helpers ---------------------------------------------------------------


def open_llama(path: Path) -> Llama:
    return Llama(
        model_path=str(path), n_ctx=256, n_threads=2, seed=0, verbose=False, logits_all=True
    )


def greedy(llm: Llama, prompt: str) -> tuple[list[int], list[float]]:
    """N_GEN greedy tokens, one at a time (the decode path), and the top-2 margin at each."""
    llm.reset()
    llm.eval(llm.tokenize(prompt.encode()))
    tokens, margins = [], []
    for _ in range(N_GEN):
        logits = np.array(llm.scores[llm.n_tokens - 1])
        top2 = np.sort(logits)[-2:]
        tokens.append(int(logits.argmax()))
        margins.append(float(top2[1] - top2[0]))
        llm.eval([tokens[-1]])
    return tokens, margins


def forced_logits(llm: Llama, tokens: list[int]) -> np.ndarray:
    """Logits at every position of `tokens`, evaluated as one batch."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)])


def rewrite(
    src: Path,
    dst: Path,
    *,
    fields: dict[str, tuple[object, GGUFValueType, GGUFValueType | None]] | None = None,
    tensors: Callable[[str, np.ndarray, QT], tuple[np.ndarray, QT] | None] | None = None,
) -> Path:
    """Copy a GGUF, replacing some keys (value, type, array sub-type) and tensors.

    `tensors(name, data, type)` returns the tensor to write instead, or None to drop it.
    """
    r = GGUFReader(src)
    fields = fields or {}
    w = GGUFWriter(dst, r.fields["general.architecture"].contents())
    if "general.alignment" in r.fields:
        w.data_alignment = int(r.fields["general.alignment"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name in fields:
            value, vtype, sub = fields[name]
            w.add_key_value(name, value, vtype, sub_type=sub)
            continue
        copy_field(w, name, f)
    for t in r.tensors:
        data, qtype = t.data, t.tensor_type
        if tensors is not None:
            new = tensors(t.name, data, qtype)
            if new is None:
                continue
            data, qtype = new
        w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# --- files -----------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sparse")


@pytest.fixture(scope="module")
def identity_f32(smollm2: Path, files: Path) -> Path:
    """Every neuron, dense order, ffn_down_t in F32: the dense model's exact weights."""
    plan = st.identity_plan(st.open_dense(smollm2))
    plan.down_type = QT.F32
    return st.write_sparse(smollm2, files / "identity-f32.gguf", plan, progress=False)


@pytest.fixture(scope="module")
def identity_q(smollm2: Path, files: Path) -> Path:
    """Every neuron, dense order, ffn_down_t requantized (Q4_1, as the converter picks)."""
    plan = st.identity_plan(st.open_dense(smollm2))
    return st.write_sparse(smollm2, files / "identity-q.gguf", plan, progress=False)


def pruned_plan(dense: st.DenseModel, drop: Callable[[int], int]) -> st.SparsePlan:
    """Each layer keeps a shuffled subset of its neurons, `drop(il)` fewer than dense."""
    rng = np.random.default_rng(0)
    layers = []
    for il, n in enumerate(dense.n_ff):
        keep = rng.permutation(n)[: n - drop(il)].astype(np.int32)
        layers.append(st.LayerPlan(keep, np.ones(len(keep), dtype=np.float32)))
    return st.SparsePlan(layers)


@pytest.fixture(scope="module")
def pruned(smollm2: Path, files: Path) -> Path:
    plan = pruned_plan(st.open_dense(smollm2), lambda il: 32 * (il % 3))
    plan.down_type = QT.F32
    return st.write_sparse(smollm2, files / "pruned.gguf", plan, progress=False)


@pytest.fixture(scope="module")
def dense_llm(smollm2: Path) -> Llama:
    return open_llama(smollm2)


@pytest.fixture(scope="module")
def dense_greedy(dense_llm: Llama) -> list[tuple[list[int], list[float]]]:
    return [greedy(dense_llm, p) for p in PROMPTS]


def forced_tokens(llm: Llama, prompt: str, generated: list[int]) -> list[int]:
    return llm.tokenize(prompt.encode()) + generated


# --- running ---------------------------------------------------------------


def test_identity_f32_matches_dense(
    dense_llm: Llama, dense_greedy: list[tuple[list[int], list[float]]], identity_f32: Path
) -> None:
    llm = open_llama(identity_f32)
    assert llm.is_sparse is True
    for prompt, (want, margins) in zip(PROMPTS, dense_greedy, strict=True):
        got, _ = greedy(llm, prompt)
        # same tokens wherever the dense model is decisive: a near tie (top-2 margin
        # below 0.5) may go either way at this model's noise floor (module docstring)
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            if a != b:
                assert margins[i] < 0.5, (prompt, i, margins[i], want, got)
                break
        assert got[:4] == want[:4], (prompt, want, got)
        tokens = forced_tokens(dense_llm, prompt, want)
        ref, out = forced_logits(dense_llm, tokens), forced_logits(llm, tokens)
        diff = np.abs(out - ref)
        assert diff.max() < 3.0 and diff.mean() < 0.35, (prompt, diff.max(), diff.mean())
        assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9, prompt
    llm.close()


def test_requantized_down_t_runs(dense_llm: Llama, identity_q: Path) -> None:
    """The converter's default (Q4_1 ffn_down_t): same model, coarser down projection."""
    llm = open_llama(identity_q)
    out = llm.create_completion(PROMPTS[0], max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert "Paris" in out, out
    tokens = dense_llm.tokenize(PROMPTS[1].encode()) + dense_llm.tokenize(
        b" there was a little", add_bos=False
    )
    ref, got = forced_logits(dense_llm, tokens), forced_logits(llm, tokens)
    assert np.isfinite(got).all()
    # measured: per-position correlation with the dense logits 0.95-0.98, top-1 7 of 8
    for r, g in zip(ref, got, strict=True):
        assert np.corrcoef(r, g)[0, 1] > 0.9
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.75
    llm.close()


def test_pruned_loads_with_per_layer_widths(pruned: Path) -> None:
    widths = GGUFReader(pruned).fields["llama.feed_forward_length"].contents()
    assert widths[:3] == [1536, 1504, 1472]  # each layer its own width
    llm = open_llama(pruned)
    assert llm.is_sparse is True
    out = llm.create_completion(PROMPTS[0], max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert "Paris" in out, out
    llm.close()


def test_permutation_changes_nothing(
    dense_llm: Llama, dense_greedy: list[tuple[list[int], list[float]]], smollm2: Path, files: Path
) -> None:
    """Every neuron kept, in a shuffled order: the FFN is the same sum, reordered."""
    plan = pruned_plan(st.open_dense(smollm2), lambda il: 0)
    plan.down_type = QT.F32
    path = st.write_sparse(smollm2, files / "shuffled.gguf", plan, progress=False)
    llm = open_llama(path)
    want, _ = dense_greedy[0]
    tokens = forced_tokens(dense_llm, PROMPTS[0], want)
    ref, out = forced_logits(dense_llm, tokens), forced_logits(llm, tokens)
    diff = np.abs(out - ref)
    assert diff.max() < 3.0 and diff.mean() < 0.35, (diff.max(), diff.mean())
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
    llm.close()
    path.unlink()


# --- malformed files -------------------------------------------------------


def u32(v: int) -> tuple[object, GGUFValueType, None]:
    return (v, GGUFValueType.UINT32, None)


def u32_array(v: list[int]) -> tuple[object, GGUFValueType, GGUFValueType]:
    return (v, GGUFValueType.ARRAY, GGUFValueType.UINT32)


def only(name: str, f: Callable[[np.ndarray, QT], tuple[np.ndarray, QT] | None]):
    return lambda n, data, qtype: f(data, qtype) if n == name else (data, qtype)


def test_wrong_shape_is_refused(identity_q: Path, tmp_path: Path) -> None:
    bad = rewrite(
        identity_q,
        tmp_path / "shape.gguf",
        tensors=only("blk.2.ffn_neuron_index", lambda d, q: (d[:-1].copy(), q)),
    )
    msg = load_error(bad)
    assert msg == (
        f"cannot load {bad}: sparse GGUF: tensor 'blk.2.ffn_neuron_index' has shape [1535], "
        "expected [1536] (feed_forward_length[2] = 1536)"
    ), msg


def test_wrong_sign_shape_is_refused(identity_q: Path, tmp_path: Path) -> None:
    bad = rewrite(
        identity_q,
        tmp_path / "sign.gguf",
        tensors=only("blk.0.ffn_gate_sign", lambda d, q: (np.ascontiguousarray(d[:, :-1]), q)),
    )
    msg = load_error(bad)
    assert (
        "sparse GGUF: tensor 'blk.0.ffn_gate_sign' has shape [17, 1536], expected [18, 1536]" in msg
    ), msg
    assert "ceil(n_embd/32) = 18" in msg, msg


def test_wrong_type_is_refused(identity_q: Path, tmp_path: Path) -> None:
    bad = rewrite(
        identity_q,
        tmp_path / "type.gguf",
        tensors=only("blk.1.ffn_down_norm", lambda d, q: (d.astype(np.float16), QT.F16)),
    )
    msg = load_error(bad)
    assert msg.endswith("sparse GGUF: tensor 'blk.1.ffn_down_norm' has type f16, expected f32"), msg

    bad = rewrite(
        identity_q,
        tmp_path / "down_t.gguf",
        tensors=only(
            "blk.4.ffn_down_t.weight",
            lambda d, q: (np.zeros((1536, 576), dtype=np.int32), QT.I32),
        ),
    )
    msg = load_error(bad)
    assert msg.endswith(
        "sparse GGUF: tensor 'blk.4.ffn_down_t.weight' has type i32, "
        "expected f32, f16, bf16 or a quantized weight type"
    ), msg


def test_width_inconsistent_with_feed_forward_length(identity_q: Path, tmp_path: Path) -> None:
    widths = [1536] * 30
    widths[3] = 1500
    bad = rewrite(
        identity_q, tmp_path / "width.gguf", fields={"llama.feed_forward_length": u32_array(widths)}
    )
    msg = load_error(bad)
    assert msg.endswith(
        "sparse GGUF: tensor 'blk.3.ffn_gate.weight' has shape [576, 1536], expected [576, 1500] "
        "(n_embd = 576, feed_forward_length[3] = 1500)"
    ), msg

    bad = rewrite(
        identity_q,
        tmp_path / "length.gguf",
        fields={"llama.feed_forward_length": u32_array([1536] * 29)},
    )
    msg = load_error(bad)
    assert "llama.feed_forward_length has wrong array length; expected 30, got 29" in msg, msg


def test_missing_and_dense_tensors_are_refused(
    identity_q: Path, smollm2: Path, tmp_path: Path
) -> None:
    bad = rewrite(
        identity_q,
        tmp_path / "missing.gguf",
        tensors=only("blk.5.ffn_up_absmean", lambda d, q: None),
    )
    assert load_error(bad).endswith("sparse GGUF: tensor 'blk.5.ffn_up_absmean' is missing")

    down = next(t for t in GGUFReader(smollm2).tensors if t.name == "blk.0.ffn_down.weight")
    extra = tmp_path / "extra.gguf"
    r = GGUFReader(identity_q)
    w = GGUFWriter(extra, "llama")
    for name, f in r.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            copy_field(w, name, f)
    for t in [*r.tensors, down]:
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = load_error(extra)
    assert msg.endswith(
        "sparse GGUF: tensor 'blk.0.ffn_down.weight' must not be present (a sparse GGUF stores it "
        "transposed, as 'blk.0.ffn_down_t.weight')"
    ), msg


def test_other_format_version_is_refused(identity_q: Path, tmp_path: Path) -> None:
    bad = rewrite(identity_q, tmp_path / "v2.gguf", fields={"sparse.format_version": u32(2)})
    msg = load_error(bad)
    assert msg == (
        f"cannot load {bad}: sparse GGUF format version 2 is not supported "
        "(this build reads version 1)"
    ), msg


def test_truncated_sparse_file(identity_q: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.gguf"
    with identity_q.open("rb") as f:
        bad.write_bytes(f.read(identity_q.stat().st_size - 1000))
    msg = load_error(bad)
    assert msg.startswith(f"cannot load {bad}: "), msg
    assert "data is not within the file bounds" in msg, msg


# --- gemma3 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3() -> Path:
    from llama_sparse import models

    return models.fetch("gemma3-270m", progress=False)


def test_gemma3_identity_f32_matches_dense(gemma3: Path, files: Path) -> None:
    plan = st.identity_plan(st.open_dense(gemma3))
    plan.down_type = QT.F32
    path = st.write_sparse(gemma3, files / "gemma3-identity-f32.gguf", plan, progress=False)
    dense, sparse = open_llama(gemma3), open_llama(path)
    assert sparse.is_sparse is True
    want, margins = greedy(dense, PROMPTS[0])
    got, _ = greedy(sparse, PROMPTS[0])
    k = next((i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), None)
    assert k is None or margins[k] < 0.5, (k, margins, want, got)
    tokens = forced_tokens(dense, PROMPTS[0], want)
    ref, out = forced_logits(dense, tokens), forced_logits(sparse, tokens)
    diff = np.abs(out - ref)
    # measured: max 1.5, mean 0.18, top-1 96 % (gemma3-270m has many near ties)
    assert diff.max() < 3.0 and diff.mean() < 0.35, (diff.max(), diff.mean())
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
    dense.close()
    sparse.close()
    path.unlink()
