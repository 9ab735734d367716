"""Sparse decoding: the ggml ops against their reference, and a converted real
model decoded in every mode (issue 4)."""

from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from llama_sparse import Llama, SparsityError, bin_dir
from llama_sparse.convert.text import evaluation_text

PROMPT = "The history of the printing press begins in the fifteenth century, when"


# --- the ops ------------------------------------------------------------------


@pytest.mark.parametrize(
    "op",
    [
        "SPARSE_PREDICT",
        "SPARSE_MUL_MAT",
        "SPARSE_MASK",
        "SPARSE_DOWN",
        "SPARSE_FFN",
        "SPARSE_MUL_MAT_PLAIN",
    ],
)
def test_backend_ops_match_reference(op: str) -> None:
    """test-backend-ops: the fast CPU kernels against the dense-then-masked
    reference, every weight type, sparsity 0 to 1, up to a 7B FFN shape (and the
    hinted dense mul_mat of a prompt batch against ggml's own)."""
    proc = subprocess.run(
        [str(bin_dir() / "test-backend-ops"), "test", "-b", "CPU", "-o", op],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    m = re.search(r"(\d+)/(\d+) tests passed", proc.stdout)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 2, proc.stdout[-2000:]


# --- a real model ---------------------------------------------------------------


def open_llama(path: Path, **kw: object) -> Llama:
    args: dict[str, object] = {"n_ctx": 256, "n_threads": 2, "verbose": False, "logits_all": True}
    args.update(kw)
    return Llama(model_path=str(path), **args)


def all_logits(llm: Llama, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


@pytest.fixture(scope="module")
def tokens(sparse_smollm2: Path) -> list[int]:
    return open_llama(sparse_smollm2).tokenize(PROMPT.encode())


def test_levels_and_modes(sparse_smollm2: Path) -> None:
    llm = open_llama(sparse_smollm2)
    assert llm.is_sparse
    assert llm.sparse_levels == pytest.approx([0.1 * i for i in range(1, 10)])
    assert (llm.sparse_mode, llm.sparsity) == ("off", 0.0)
    llm.set_sparsity(level=0.5)
    assert (llm.sparse_mode, llm.sparsity) == ("threshold", 0.5)  # auto on a SiLU model
    llm.set_sparsity(mode="predict")
    assert (llm.sparse_mode, llm.sparsity) == ("predict", 0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 0.55}, "not in this model's table"),
        ({"sparsity": 0.9, "sparse_mode": "threshold"}, "cannot reach sparsity level 0.9"),
        ({"sparsity": 1.5}, "out of range"),
        ({"sparse_alpha": 0.0}, "alpha 0 is out of range"),
        ({"sparse_mode": "fast"}, "unknown sparse mode 'fast'"),
        ({"sparsity": 0.5, "sparse_mode": "off"}, "needs mode threshold or predict"),
    ],
)
def test_bad_settings_are_refused(
    sparse_smollm2: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(SparsityError, match=re.escape(message)):
        open_llama(sparse_smollm2, **kwargs)


def test_dense_model_refuses_sparsity(smollm2: Path) -> None:
    with pytest.raises(SparsityError, match="dense GGUF"):
        open_llama(smollm2, sparsity=0.5)
    llm = open_llama(smollm2, sparse_mode="off")  # asking for nothing sparse is fine
    assert llm.sparse_levels == []


def test_level_zero_is_dense(sparse_smollm2: Path, tokens: list[int]) -> None:
    """Threshold and predict at level 0 skip only exact zeros: the same logits as mode off."""
    llm = open_llama(sparse_smollm2, n_batch=1)
    ref = all_logits(llm, tokens)
    for mode in ("threshold", "predict"):
        llm.set_sparsity(mode=mode, level=0.0)
        np.testing.assert_allclose(all_logits(llm, tokens), ref, atol=2e-3, rtol=0)


def test_token_by_token_equals_batched(sparse_smollm2: Path, tokens: list[int]) -> None:
    """Decoding (skipping kernels, 1 token per batch) and a prompt batch (dense
    products, same masks) read the same rows and give close logits: far closer to
    each other than to dense.

    Not equal: the skipping kernels sum in another order than ggml's mat-mul, and
    SmolLM2's activations, rounded to 8 bits before every product, carry a change
    in the last bit over a rounding boundary now and then. Measured on this
    fixture: 0.11 mean-abs apart in mode off; at level 0.3, where such a change
    also flips a neuron near its threshold, 0.44 (threshold) and 0.50 (predict)
    against 1.1 and 4.5 to dense, with the rows read per layer within 0.005."""
    dense = all_logits(open_llama(sparse_smollm2, n_batch=1), tokens)
    for mode in ("threshold", "predict"):
        kw: dict[str, object] = {"sparse_mode": mode, "sparsity": 0.3}
        llm_one = open_llama(sparse_smollm2, n_batch=1, **kw)
        llm_batch = open_llama(sparse_smollm2, n_batch=64, **kw)
        one = all_logits(llm_one, tokens)
        batch = all_logits(llm_batch, tokens)
        rows_one = np.array(llm_one.sparse_stats()["layers"])
        rows_batch = np.array(llm_batch.sparse_stats()["layers"])
        assert np.abs(rows_one - rows_batch).max() < 0.02, (mode, rows_one, rows_batch)
        between = np.abs(one - batch).mean()
        to_dense = np.abs(one - dense).mean()
        assert between < 0.6 * to_dense, (mode, between, to_dense)
        assert (one.argmax(-1) == batch.argmax(-1)).mean() >= 0.9, mode


def test_results_do_not_depend_on_threads(sparse_smollm2: Path, tokens: list[int]) -> None:
    one = all_logits(open_llama(sparse_smollm2, n_threads=1, n_batch=1, sparsity=0.5), tokens)
    two = all_logits(open_llama(sparse_smollm2, n_threads=2, n_batch=1, sparsity=0.5), tokens)
    np.testing.assert_allclose(one, two, atol=1e-4, rtol=0)


def test_stats_follow_the_level(sparse_smollm2: Path) -> None:
    llm = open_llama(sparse_smollm2)
    stats = llm.sparse_stats()
    assert stats["sparsity"] is None and stats["mode"] == "off"

    # Measured on fixed text, not on the model's own continuation, which any change in rounding
    # that flips a greedy token moves: 4 pieces of 200 tokens spread over the evaluation text
    # (disjoint from the calibration text)
    held = llm.tokenize(evaluation_text()[0].encode())
    pieces = [held[i * (len(held) // 4) :][:200] for i in range(4)]
    achieved = {}
    for level in (0.3, 0.6):
        llm.set_sparsity(level=level)
        llm.sparse_stats(reset=True)
        llm.create_completion(PROMPT, max_tokens=16, temperature=0.0)
        stats = llm.sparse_stats()
        assert stats["tokens"] >= 16  # the prompt's prefix may be cached
        assert len(stats["layers"]) == 30 and all(0.0 <= s < 1.0 for s in stats["layers"])
        llm.sparse_stats(reset=True)
        for piece in pieces:
            llm.reset()
            llm.eval(piece)
        stats = llm.sparse_stats()
        assert stats["tokens"] == sum(map(len, pieces))
        achieved[level] = stats["sparsity"]
        # The table's level is met on text unlike the calibration text within a margin. The
        # fixture calibrates on 2048 tokens only; on these pieces it overshoots by 0.09 (level
        # 0.3) and 0.13 (0.6), the default calibration by 0.04-0.05 (docs/BENCHMARKS.md).
        assert abs(stats["sparsity"] - level) < 0.15, stats
    assert achieved[0.6] > achieved[0.3]


def test_sparsity_changes_between_calls(sparse_smollm2: Path, tokens: list[int]) -> None:
    llm = open_llama(sparse_smollm2, n_batch=1)
    dense = all_logits(llm, tokens)
    llm.set_sparsity(level=0.6)
    sparse = all_logits(llm, tokens)
    llm.set_sparsity(mode="off", level=0.0)
    again = all_logits(llm, tokens)
    assert np.abs(sparse - dense).max() > 0.1
    np.testing.assert_array_equal(again, dense)


# --- sequences at different settings in one batch (the server's per-request level) ---


class SeqDecoder:
    """A raw context with several sequences, decoded with llama_cpp's C API."""

    def __init__(self, llm: Llama, n_seq: int) -> None:
        from llama_sparse._binding import llama_cpp

        self.c = llama_cpp
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_seq_max = 512, 512, n_seq
        params.n_threads = params.n_threads_batch = 2
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        self.n_vocab = llm.n_vocab()

    def decode(self, seqs: dict[int, list[int]], start: dict[int, int]) -> dict[int, np.ndarray]:
        """Decode each sequence's tokens (positions from start[seq]) in one batch;
        the last logits of each."""
        c = self.c
        n = sum(len(t) for t in seqs.values())
        batch = c.llama_batch_init(n, 0, 1)
        last: dict[int, int] = {}
        i = 0
        for seq, toks in seqs.items():
            for k, tok in enumerate(toks):
                batch.token[i], batch.pos[i] = tok, start.get(seq, 0) + k
                batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq
                batch.logits[i] = k == len(toks) - 1
                if batch.logits[i]:
                    last[seq] = i
                i += 1
        batch.n_tokens = n
        assert c.llama_decode(self.ctx, batch) == 0
        out = {
            seq: np.ctypeslib.as_array(c.llama_get_logits_ith(self.ctx, j), (self.n_vocab,)).copy()
            for seq, j in last.items()
        }
        c.llama_batch_free(batch)
        return out

    def clear(self) -> None:
        self.c.llama_memory_clear(self.c.llama_get_memory(self.ctx), True)

    def set_seq(self, seq: int, level: float | None) -> None:
        from llama_sparse import _binding as b

        p = None if level is None else b.llama_sparse_params(b.LLAMA_SPARSE_MODE_AUTO, level, 1.0)
        err = ctypes.create_string_buffer(256)
        ref = None if p is None else ctypes.byref(p)
        assert b.llama_sparse_set_seq(self.ctx, seq, ref, err, len(err)) == 0, err.value

    def close(self) -> None:
        self.c.llama_free(self.ctx)


def test_sequences_at_different_levels_share_a_batch(sparse_smollm2: Path) -> None:
    """Three sequences (level 0.5, level 0.1, the context's: dense) decoded in
    one batch, the prompt (dense products, per-token masks) and then one token
    each (skipping kernels): each gets the logits it gets in the same batch with
    every sequence at its level, and its own statistics.

    Not the logits it gets decoded alone: llama.cpp splits a batch of several
    sequences into ubatches of equal shares, so the last tokens of the longer
    prompts go through a small ubatch (the skipping kernels) where alone they go
    through a large one (ggml's mat-mul), which sum in another order, and a
    threshold turns that into whole neurons kept or skipped. Measured (AMD EPYC):
    mode off 0.0-0.15 mean-abs; level 0.1 0.39 at the prompt, more than the
    level's own effect (0.23); level 0.5 0.0 (effect 12)."""
    from llama_sparse import _binding as b

    llm = open_llama(sparse_smollm2)
    prompts = [
        llm.tokenize(PROMPT.encode()),
        llm.tokenize(b"Rivers carry water from the mountains to the sea, and along the way"),
        llm.tokenize(b"In mathematics, a prime number is a natural number greater than one that"),
    ]
    nxt = {0: [llm.tokenize(b" the")[-1]], 1: [llm.tokenize(b" they")[-1]], 2: [262]}
    after = {s: len(p) for s, p in enumerate(prompts)}
    d = SeqDecoder(llm, 3)
    b.llama_sparse_set_stats(d.ctx, True)

    def logits(levels: dict[int, float | None], together: bool) -> dict[int, list[np.ndarray]]:
        """[prompt, next token] last logits of each sequence, at its level"""
        groups = [list(levels)] if together else [[s] for s in levels]
        out: dict[int, list[np.ndarray]] = {}
        for group in groups:
            d.clear()
            b.llama_sparse_stats_reset(d.ctx)
            for s in group:
                d.set_seq(s, levels[s])
            first = d.decode({s: prompts[s] for s in group}, {})
            second = d.decode({s: nxt[s] for s in group}, after)
            out.update({s: [first[s], second[s]] for s in group})
        return out

    try:
        dense = {0: None, 1: None, 2: None}
        noise = [logits(dense, False), logits(dense, True)]
        levels = {0: 0.5, 1: 0.1, 2: None}
        alone = logits(levels, False)
        # the same batch with every sequence at one level: no neighbour's level to leak in
        same = {None: noise[1]} | {lv: logits(dict.fromkeys(levels, lv), True) for lv in (0.5, 0.1)}
        together = logits(levels, True)  # its statistics stay in d.ctx
        for seq, lv in levels.items():
            for step in range(2):
                # a neighbour's level would move the logits by about its effect (0.2-12)
                effect = np.abs(alone[seq][step] - noise[0][seq][step]).mean()
                diff = np.abs(together[seq][step] - same[lv][seq][step]).mean()
                assert diff <= 0.02, (seq, step, diff, effect)
                # against decoding alone: within the alone-vs-batched difference of mode off
                # and of the level itself
                noise_off = np.abs(noise[0][seq][step] - noise[1][seq][step]).mean()
                batched = np.abs(same[lv][seq][step] - alone[seq][step]).mean()
                apart = np.abs(together[seq][step] - alone[seq][step]).mean()
                bound = 3 * max(noise_off, batched) + 0.05 * effect + 1e-3
                assert apart <= bound, (seq, step, apart, noise_off, batched, effect)
                if lv is not None:  # the level does something
                    assert effect > 0.1, (seq, step, effect)

        achieved = {}
        for seq in levels:
            n = ctypes.c_double()
            achieved[seq] = b.llama_sparse_seq_stats(d.ctx, seq, ctypes.byref(n))
            assert n.value == len(prompts[seq]) + 1, (seq, n.value)
        assert achieved[0] > achieved[1] + 0.2, achieved
        assert 0.0 <= achieved[2] < 0.01, achieved  # dense: only exact zeros skipped
        assert abs(achieved[0] - 0.5) < 0.15 and abs(achieved[1] - 0.1) < 0.1, achieved
        assert b.llama_sparse_get_seq(d.ctx, 0).level == pytest.approx(0.5)
        assert b.llama_sparse_get_seq(d.ctx, 2).mode == b.LLAMA_SPARSE_MODE_OFF
    finally:
        d.close()


def test_cli_flags(sparse_smollm2: Path) -> None:
    def complete(*flags: str) -> subprocess.CompletedProcess[str]:
        args = ["-p", "The capital of France is", "-n", "8", "-t", "2", "--temp", "0", "-no-cnv"]
        return subprocess.run(
            [str(bin_dir() / "llama-completion"), "-m", str(sparse_smollm2), *args, *flags],
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = complete("--sparsity", "0.3", "-lv", "4")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "sparse mode threshold, level 0.3" in ok.stderr
    bad = complete("--sparsity", "2")
    assert bad.returncode != 0 and "--sparsity 2 is out of range" in bad.stderr
    unreachable = complete("--sparse-mode", "threshold", "--sparsity", "0.9")
    assert unreachable.returncode != 0
    assert "mode threshold cannot reach sparsity level 0.9" in unreachable.stderr


# --- a ReLU model: the predictor's mechanics --------------------------------------


@pytest.fixture(scope="module")
def relu_model(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's weights declared as a ReLU model (sparse.activation = relu), every
    neuron, F32 ffn_down_t, and a one-level table whose predictor alpha is so large
    that it predicts nothing, with thresholds 0."""
    from gguf import GGMLQuantizationType as QT

    from llama_sparse.convert import structure as st

    dense = st.open_dense(smollm2)
    plan = st.identity_plan(dense)
    plan.down_type = QT.F32
    n = dense.n_layer
    zeros = np.zeros(n, dtype=np.float32)
    plan.metadata = {
        "sparse.activation": "relu",
        "sparse.levels": np.array([0.5], dtype=np.float32),
        "sparse.predictor.alpha": np.ones(n, dtype=np.float32),
        "sparse.threshold.gate": zeros,
        "sparse.threshold.up": zeros,
        "sparse.threshold.achieved": np.array([0.5], dtype=np.float32),
        "sparse.predict.alpha": np.full(n, 1e6, dtype=np.float32),
        "sparse.predict.gate": zeros,
        "sparse.predict.up": zeros,
        "sparse.predict.achieved": np.array([0.5], dtype=np.float32),
    }
    out = tmp_path_factory.mktemp("relu") / "relu.gguf"
    return st.write_sparse(smollm2, out, plan, progress=False)


def test_relu_model_predicts_by_default(relu_model: Path) -> None:
    llm = open_llama(relu_model, sparsity=0.5)
    assert llm.sparse_mode == "predict"


def test_predictor_that_predicts_nothing_is_dense(relu_model: Path, tokens: list[int]) -> None:
    llm = open_llama(relu_model, n_batch=1)
    dense = all_logits(llm, tokens)
    llm.set_sparsity(mode="predict", level=0.5)
    np.testing.assert_allclose(all_logits(llm, tokens), dense, atol=2e-3, rtol=0)
    # alpha scaled down to ~1 predicts about half the neurons negative: the output changes
    llm.set_sparsity(alpha=1e-6)
    assert np.abs(all_logits(llm, tokens) - dense).max() > 0.1


def test_relu_zeros_are_skipped_exactly(relu_model: Path, tokens: list[int]) -> None:
    """Thresholds 0 skip exactly the neurons ReLU zeroed: many rows, same logits."""
    llm = open_llama(relu_model, n_batch=1)
    dense = all_logits(llm, tokens)
    llm.set_sparsity(mode="threshold", level=0.0)
    np.testing.assert_allclose(all_logits(llm, tokens), dense, atol=2e-3, rtol=0)
    skipped = llm.sparse_stats()["sparsity"]
    assert skipped is not None and skipped > 0.2


# --- RPC ------------------------------------------------------------------------


def offloaded_bytes(path: Path, ngl: int) -> int:
    """What llama.cpp puts on the device with -ngl ngl: the last ngl - 1 layers,
    every tensor of them (the sparse ones included), and the output layer."""
    import gguf

    r = gguf.GGUFReader(path)
    n_layer = int(r.fields["llama.block_count"].parts[-1][0])
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    on_device = [f"blk.{il}." for il in range(n_layer + 1 - ngl, n_layer)]
    layers = sum(n for name, n in sizes.items() if name.startswith(tuple(on_device)))
    output = sizes.get("output.weight", sizes["token_embd.weight"])  # tied: a copy of token_embd
    return layers + output + sizes["output_norm.weight"]


def test_rpc_loopback_gives_the_same_tokens(sparse_smollm2: Path) -> None:
    """The sparse ops go through ggml's RPC backend: a model offloaded to an
    rpc-server on loopback, whole or in part (a mixed split: sparse layers on
    both backends), decodes the same tokens as locally, and a partly offloaded
    layer's sparse tensors go to the device with it (the device's model buffer
    holds exactly the offloaded layers' tensors)."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(bin_dir() / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "rpc-server did not start"
                time.sleep(0.2)

        def complete(*flags: str) -> tuple[str, str]:
            args = ["-p", PROMPT, "-n", "24", "-t", "2", "--temp", "0", "-no-cnv", "-lv", "4"]
            args += ["--sparsity", "0.5"]
            proc = subprocess.run(
                [str(bin_dir() / "llama-completion"), "-m", str(sparse_smollm2), *args, *flags],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            return proc.stdout, proc.stderr

        local, _ = complete()
        assert len(local) > len(PROMPT) + 20
        for ngl in (99, 10):
            remote, log = complete("--rpc", f"127.0.0.1:{port}", "-ngl", str(ngl))
            assert remote == local, ngl
            if ngl == 10:
                m = re.search(r"RPC0\[[^\]]*\] model buffer size = +([\d.]+) MiB", log)
                assert m, log[-3000:]
                expect = offloaded_bytes(sparse_smollm2, ngl) / 2**20
                assert abs(float(m.group(1)) - expect) < 0.02, (m.group(1), expect)
    finally:
        server.terminate()
        server.wait(timeout=30)
