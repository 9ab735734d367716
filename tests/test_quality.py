"""llama_sparse.quality: perplexity, KL divergence and top-1 agreement via llama-perplexity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from llama_sparse import quality
from llama_sparse.convert.structure import copy_field

# Real English text shipped with Debian (base-files).
TEXT = Path("/usr/share/common-licenses/GPL-3")


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("text") / "gpl3.txt"
    out.write_bytes(TEXT.read_bytes()[:12000])
    return out


def damaged_copy(src: Path, dst: Path) -> Path:
    """The same model with layer 3's FFN output zeroed."""
    r = GGUFReader(src)
    w = GGUFWriter(dst, r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            copy_field(w, name, f)
    for t in r.tensors:
        data = np.zeros_like(t.data) if t.name == "blk.3.ffn_down.weight" else t.data
        w.add_tensor(t.name, data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_model_against_itself(smollm2: Path, text: Path) -> None:
    (q,) = quality.compare(smollm2, [smollm2], text, ctx=256)
    assert q.ppl == pytest.approx(q.ppl_base, rel=1e-4)
    assert abs(q.mean_kld) < 1e-4 and q.top1 == 1.0
    assert q.ppl_change_2se < 1e-4
    assert quality.perplexity(smollm2, text, ctx=256) == pytest.approx(q.ppl_base, rel=1e-3)


def test_damaged_model_is_measured_worse(smollm2: Path, text: Path, tmp_path: Path) -> None:
    bad = damaged_copy(smollm2, tmp_path / "bad.gguf")
    (q,) = quality.compare(smollm2, [bad], text, ctx=256)
    assert q.ppl_change > 0.01
    assert 0.0 < q.ppl_change_2se < q.ppl_change
    assert q.mean_kld > 0.01
    assert 0.0 < q.top1 < 0.99


def test_failure_is_reported(tmp_path: Path, text: Path) -> None:
    with pytest.raises(quality.QualityError, match="failed"):
        quality.perplexity(tmp_path / "missing.gguf", text)


def test_short_text_is_reported(smollm2: Path, tmp_path: Path) -> None:
    """llama-perplexity exits 0 on a text shorter than two contexts; we must not."""
    short = tmp_path / "short.txt"
    short.write_bytes(TEXT.read_bytes()[:1500])
    with pytest.raises(quality.QualityError, match=r"short .* context of 256 needs at least 512"):
        quality.perplexity(smollm2, short, ctx=256)
    with pytest.raises(quality.QualityError, match="too short"):
        quality.compare(smollm2, [smollm2], short, ctx=256)
