"""Calibration, predictor alpha and threshold tables on the real SmolLM2 model.

One calibration run on the default calibration text and one held-out run on
the evaluation text (both pydoc_data topics, disjoint) are shared by all
tests of this module (about a minute on 2 threads).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convert import allocate, calibrate, text  # noqa: E402

N_CAL = 2048
N_HELD = 1024


@pytest.fixture(scope="module")
def cal(smollm2: Path) -> calibrate.CalibrationStats:
    t, src = text.calibration_text()
    return calibrate.calibrate(
        smollm2, t, N_CAL, n_threads=2, n_samples=512, source=src, progress=False
    )


@pytest.fixture(scope="module")
def held(smollm2: Path) -> calibrate.CalibrationStats:
    t, src = text.evaluation_text()
    return calibrate.calibrate(
        smollm2, t, N_HELD, n_threads=2, n_samples=512, source=src, progress=False
    )


@pytest.fixture(scope="module")
def greedy(cal: calibrate.CalibrationStats) -> allocate.Tables:
    return allocate.allocate(cal, method="greedy")


@pytest.fixture(scope="module")
def uniform(cal: calibrate.CalibrationStats) -> allocate.Tables:
    return allocate.allocate(cal, method="uniform")


@pytest.fixture(scope="module")
def cats(cal: calibrate.CalibrationStats) -> allocate.Tables:
    return allocate.allocate(cal, method="cats")


# -- text --------------------------------------------------------------------


def test_texts_disjoint_and_long_enough(smollm2: Path) -> None:
    cal_text, cal_src = text.calibration_text()
    eval_text, eval_src = text.evaluation_text()
    assert "pydoc_data" in cal_src and cal_src != eval_src
    cal_paras = {p.strip() for p in cal_text.split("\n\n")}
    eval_paras = {p.strip() for p in eval_text.split("\n\n")}
    assert len(cal_paras) > 500 and len(eval_paras) > 500
    assert not cal_paras & eval_paras
    # and almost no longer line of the evaluation text occurs in the calibration text
    cal_lines = {ln.strip() for ln in cal_text.splitlines() if len(ln.strip()) > 30}
    eval_lines = [ln.strip() for ln in eval_text.splitlines() if len(ln.strip()) > 30]
    assert sum(ln in cal_lines for ln in eval_lines) < 0.02 * len(eval_lines)
    assert len(calibrate.tokenize_with_model(smollm2, cal_text)) >= 16384
    assert len(calibrate.tokenize_with_model(smollm2, eval_text)) >= 16384


# -- calibration -------------------------------------------------------------


def test_calibration_shapes(cal: calibrate.CalibrationStats) -> None:
    assert cal.arch == "llama" and cal.activation == "silu"
    assert cal.n_layer == 30 and cal.n_embd == 576 and cal.n_ff == [1536] * 30
    assert cal.n_tokens == N_CAL
    assert cal.row_bytes.shape == (30, 3) and np.all(cal.row_bytes > 0)
    per_neuron = (
        cal.freq,
        cal.up_absmean,
        cal.act_absmean,
        cal.h_absmean,
        cal.act_absmax,
        cal.h_absmax,
        cal.down_norm,
        cal.agreement,
    )
    for arrays in per_neuron:
        assert len(arrays) == 30
        assert all(a.shape == (1536,) and np.all(np.isfinite(a)) for a in arrays)
    assert cal.nneg_hist_neg.shape == cal.nneg_hist_pos.shape == (30, 577)
    assert 500 <= cal.n_samples <= 520
    for il in range(30):
        assert cal.sample_gate[il].shape == cal.sample_up[il].shape == (cal.n_samples, 1536)
        assert cal.sample_nneg[il].shape == (cal.n_samples, 1536)


def test_calibration_values(cal: calibrate.CalibrationStats) -> None:
    # every token reaches every layer, the last one included (SmolLM2 adds no BOS)
    rows = (cal.nneg_hist_neg.sum(axis=1) + cal.nneg_hist_pos.sum(axis=1)) // 1536
    assert np.all(rows == N_CAL)
    for il in range(30):
        f = cal.freq[il]
        assert np.all((f >= 0) & (f <= 1))
        assert np.all((cal.agreement[il] >= 0) & (cal.agreement[il] <= 1))
        assert np.all(cal.up_absmean[il] > 0) and np.all(cal.down_norm[il] > 0)
        assert np.all(cal.h_absmax[il] >= cal.h_absmean[il])
        # SiLU: neither always on nor always off on average
        assert 0.05 < f.mean() < 0.95
        # per-neuron agreement at alpha = 1 and the histograms agree
        n = np.arange(577)
        pred_neg = 2 * n > 576
        hist_agree = cal.nneg_hist_neg[il][pred_neg].sum() + cal.nneg_hist_pos[il][~pred_neg].sum()
        assert hist_agree / (rows[il] * 1536) == pytest.approx(cal.agreement[il].mean(), abs=1e-5)
        # the sign predictor beats chance on real weights
        assert cal.agreement[il].mean() > 0.6
    # sample frequencies match the full-run ones (same text, strided tokens)
    f_sample = np.mean([(cal.sample_gate[il] > 0).mean() for il in range(30)])
    assert f_sample == pytest.approx(np.mean([f.mean() for f in cal.freq]), abs=0.02)


def test_hot_order_and_dead_scores(cal: calibrate.CalibrationStats) -> None:
    order = cal.hot_order(3)
    assert sorted(order.tolist()) == list(range(1536))
    assert np.all(np.diff(cal.freq[3][order]) <= 0)
    sub = cal.hot_order(3, np.arange(0, 1536, 2))
    assert sorted(sub.tolist()) == list(range(0, 1536, 2))
    smax = cal.score3_max(3)
    assert np.all(smax >= 0)
    # the sample (float16 copies of g and u) never exceeds the full-run maximum
    assert np.all(smax * 1.01 + 1e-6 >= cal.score3(3).max(axis=0))


def test_down_norm_from_weights(cal: calibrate.CalibrationStats) -> None:
    down = calibrate.load_down(cal.model_path, 7)
    assert down.shape == (576, 1536)
    np.testing.assert_allclose(cal.down_norm[7], np.linalg.norm(down, axis=0), rtol=1e-5)


def test_scores(cal: calibrate.CalibrationStats) -> None:
    il = 11
    s2, s3 = cal.score2(il), cal.score3(il)
    assert s2.shape == s3.shape == (cal.n_samples, 1536)
    assert np.all(s2 >= 0) and np.all(s3 >= 0)
    q = cal.score_quantiles(il, 3, np.array([0.1, 0.5, 0.9]))
    assert q[0] <= q[1] <= q[2]


# -- predictor ---------------------------------------------------------------


def test_alpha_large_predicts_nothing(cal: calibrate.CalibrationStats) -> None:
    for il in (0, 15, 29):
        nneg = cal.sample_nneg[il]
        assert not allocate.predict_skip(nneg, 576, 1e4).any()
        assert not allocate.predict_skip(nneg, 576, 0.0).any()  # alpha <= 0: off
        assert allocate.predict_skip(nneg, 576, 1.0).mean() > 0.2
        assert allocate.predictor_precision(cal, il, 1e4)[1] == 0.0


def test_alpha_reaches_precision(cal: calibrate.CalibrationStats) -> None:
    a90 = allocate.calibrate_alpha(cal, 0.90)
    a99 = allocate.calibrate_alpha(cal, 0.99)
    assert a90.shape == (30,)
    for il in range(30):
        if a99[il] > 0:
            assert a99[il] >= a90[il] > 0
            prec, rate = allocate.predictor_precision(cal, il, float(a99[il]))
            assert prec >= 0.99 and rate > 0
        # a bit more aggressive than the calibrated alpha misses the target
        if a90[il] > 0:
            assert allocate.predictor_precision(cal, il, float(a90[il]) * 0.97)[0] < 0.90


# -- tables ------------------------------------------------------------------


def test_table_shapes(greedy: allocate.Tables) -> None:
    L = len(allocate.DEFAULT_LEVELS)
    for t in (greedy.threshold, greedy.predict):
        for a in (t.alpha, t.gate, t.up):
            assert a.shape == (L, 30) and a.dtype == np.float32
    assert np.all(greedy.threshold.alpha == 0)
    # mode threshold reads every gate row: at most (up + down) / (gate + up + down) = 2/3
    assert greedy.reachable("threshold").tolist() == [True] * 6 + [False] * 3
    meta = greedy.metadata()
    assert meta["sparse.allocation"] == "greedy"
    assert len(meta["sparse.levels"]) == L and len(meta["sparse.predictor.alpha"]) == 30
    for key in ("threshold.gate", "threshold.up", "predict.alpha", "predict.gate", "predict.up"):
        assert len(meta[f"sparse.{key}"]) == L * 30
    # level-major: entry l * n_layer + N
    assert meta["sparse.threshold.up"][2 * 30 + 5] == pytest.approx(greedy.threshold.up[2, 5])
    # greedy only raises thresholds as the level grows
    assert np.all(np.diff(greedy.threshold.gate, axis=0) >= 0)
    assert np.all(np.diff(greedy.threshold.up, axis=0) >= 0)
    # the predictor is never more aggressive than the calibrated precision allows
    pa = greedy.predict.alpha
    assert np.all((pa == 0) | (pa >= greedy.predictor_alpha[None, :] * (1 - 1e-6)))


@pytest.mark.parametrize("mode", ["threshold", "predict"])
def test_levels_hold_on_held_out_tokens(
    mode: str,
    cal: calibrate.CalibrationStats,
    held: calibrate.CalibrationStats,
    greedy: allocate.Tables,
    uniform: allocate.Tables,
    cats: allocate.Tables,
) -> None:
    for tables in (greedy, uniform, cats):
        table = getattr(tables, mode)
        reachable = 0
        on_cal = allocate.apply_tables(cal, tables, mode)
        on_held = allocate.apply_tables(held, tables, mode, ref=cal)
        for lv, level in enumerate(tables.levels):
            # the rules applied directly reproduce the allocation's own accounting
            assert on_cal[lv].sparsity == pytest.approx(table.achieved[lv], abs=1e-6)
            assert on_cal[lv].error == pytest.approx(table.error[lv], rel=1e-4, abs=1e-9)
            if table.achieved[lv] < level - 0.01:  # beyond what the mode can skip
                continue
            reachable += 1
            # held-out text: the level still holds
            assert on_held[lv].sparsity == pytest.approx(level, abs=0.04), (
                tables.allocation,
                level,
            )
        assert reachable >= 6  # 0.1 .. 0.6 at least


def test_greedy_beats_uniform_and_cats(
    greedy: allocate.Tables, uniform: allocate.Tables, cats: allocate.Tables
) -> None:
    for lv, level in enumerate(greedy.levels):
        g, u, c = greedy.threshold, uniform.threshold, cats.threshold
        if g.achieved[lv] < level - 0.01:
            continue
        assert abs(u.achieved[lv] - g.achieved[lv]) < 0.01
        assert abs(c.achieved[lv] - g.achieved[lv]) < 0.01
        assert g.error[lv] <= u.error[lv]
        assert g.error[lv] <= c.error[lv]
        assert greedy.predict.error[lv] <= uniform.predict.error[lv]
    # at 50 % the difference is not marginal
    i50 = int(np.argmin(np.abs(greedy.levels - 0.5)))
    assert greedy.threshold.error[i50] < 0.9 * uniform.threshold.error[i50]
    assert uniform.threshold.error[i50] < cats.threshold.error[i50]
    # CATS skips at point 2 only, on the plain |act(g)|
    assert np.all(cats.threshold.up == 0) and np.all(cats.predict.up == 0)
    assert cats.plain_gate and not greedy.plain_gate


def test_dead_neurons_excluded(cal: calibrate.CalibrationStats) -> None:
    keep = [np.argsort(-f)[:1024] for f in cal.freq]
    t = allocate.allocate(cal, (0.3, 0.5), method="greedy", keep=keep)
    out = allocate.apply_level(cal, t, 1, "threshold", keep=keep)
    assert out.sparsity == pytest.approx(0.5, abs=0.01)
