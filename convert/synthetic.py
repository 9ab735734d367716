"""Synthetic GGUFs: real layer shapes, random weights, few layers.

For speed measurements and converter tests at shapes no registry package
ships (Llama-2-7B, Llama-2-70B). The weights are random (normal, scaled like
an initialised transformer), so the text such a model writes is noise; every
file says so in `general.name` and `general.description`. The tokenizer is a
real one, copied from a registry model (SmolLM2), so that llama.cpp can load,
tokenize and run the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFWriter
from tqdm import tqdm

from .structure import copy_field, quantize_rows


@dataclass(frozen=True)
class Shape:
    name: str
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int


SHAPES = {
    s.name: s
    for s in (
        Shape("llama2-7b", 4096, 11008, 32, 32),
        Shape("llama2-70b", 8192, 28672, 64, 8),
    )
}


def write_synthetic(
    out: Path,
    tokenizer_from: Path,
    shape: Shape,
    *,
    n_layer: int = 2,
    qtype: QT = QT.Q4_0,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a llama-architecture GGUF with `shape`'s layer shapes and random weights."""
    rng = np.random.default_rng(seed)
    tok = GGUFReader(tokenizer_from)
    vocab = len(tok.fields["tokenizer.ggml.tokens"].contents())
    head_dim = shape.n_embd // shape.n_head
    w = GGUFWriter(out, "llama")
    w.add_name(f"synthetic {shape.name} shapes, {n_layer} layers (random weights)")
    w.add_description(
        "llama-sparse synthetic model: real layer shapes, random weights; not a language model"
    )
    w.add_block_count(n_layer)
    w.add_context_length(4096)
    w.add_embedding_length(shape.n_embd)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    for name, f in tok.fields.items():
        if name.startswith("tokenizer."):
            copy_field(w, name, f)

    def matrix(rows: int, cols: int, t: QT = qtype) -> tuple[np.ndarray, QT]:
        x = rng.standard_normal((rows, cols), dtype=np.float32) * (1.0 / np.sqrt(cols))
        return quantize_rows(x, t), t

    kv = shape.n_head_kv * head_dim
    tensors: list[tuple[str, tuple[np.ndarray, QT] | np.ndarray]] = [
        ("token_embd.weight", matrix(vocab, shape.n_embd, QT.Q8_0)),
        ("output_norm.weight", np.ones(shape.n_embd, dtype=np.float32)),
    ]
    for il in range(n_layer):
        tensors += [
            (f"blk.{il}.attn_norm.weight", np.ones(shape.n_embd, dtype=np.float32)),
            (f"blk.{il}.attn_q.weight", matrix(shape.n_embd, shape.n_embd)),
            (f"blk.{il}.attn_k.weight", matrix(kv, shape.n_embd)),
            (f"blk.{il}.attn_v.weight", matrix(kv, shape.n_embd)),
            (f"blk.{il}.attn_output.weight", matrix(shape.n_embd, shape.n_embd)),
            (f"blk.{il}.ffn_norm.weight", np.ones(shape.n_embd, dtype=np.float32)),
            (f"blk.{il}.ffn_gate.weight", matrix(shape.n_ff, shape.n_embd)),
            (f"blk.{il}.ffn_up.weight", matrix(shape.n_ff, shape.n_embd)),
            (f"blk.{il}.ffn_down.weight", matrix(shape.n_embd, shape.n_ff)),
        ]
    for name, t in tqdm(tensors, desc="synthetic tensors", disable=not progress):
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_shape=t[0].shape, raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=progress)
    w.close()
    return out
