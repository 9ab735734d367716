"""Write a sparse GGUF (docs/FORMAT.md, version 1) from a dense one and a plan.

The plan says, per layer, which dense neurons to keep and in which order
(hot-first), plus the calibrated per-neuron and per-layer values. This module
does the file work: prune and reorder gate and up rows (raw bytes, lossless),
transpose the down projection into `ffn_down_t` (requantized with ggml's own
quantizers when the weights are quantized, with rounding errors compensated
over the calibration inputs), pack the gate sign bits, and write the result
atomically next to the destination.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize
from tqdm import tqdm

from llama_sparse import __version__

from ._ggml import ggml_base

FORMAT_VERSION = 1
# Architectures whose FFN upstream builds with build_ffn and a gate, and
# whose graphs llama-sparse patches; value: the FFN activation.
SUPPORTED_ARCHS = {
    "llama": "silu",
    "qwen2": "silu",
    "qwen3": "silu",
    "gemma2": "gelu",
    "gemma3": "gelu",
}
# Row length n_embd does not fit the input's block size (K-quants: 256):
# the legacy type with at least as many bits per weight.
DOWN_T_FALLBACK = {
    QT.Q2_K: QT.Q4_0,
    QT.Q3_K: QT.Q4_0,
    QT.Q4_K: QT.Q4_1,
    QT.Q5_K: QT.Q5_1,
    QT.Q6_K: QT.Q8_0,
}
LOSSLESS = (QT.F32, QT.F16, QT.BF16)
# Requantizing ffn_down_t with compensation (docs/FORMAT.md): Hessian damping, a
# fraction of its mean diagonal. The Hessian comes from 1024 sampled tokens for
# 1536+ neurons; at GPTQ's 0.01 that overfits (SmolLM2 Q8_0, layers 3 and 20: the
# product's error on held-out tokens 2-15 % above plain rounding), at 1.0 15-19 % below.
COMPENSATE_DAMP = 1.0
# rows per lazy update of the rows after them
COMPENSATE_BLOCK = 128
# rows compensated together at most (diagonal blocks of the Hessian): the
# Hessian's inverse costs n^3, seconds for a 7B layer's 11008 rows in groups
COMPENSATE_GROUP = 2048


class ConvertError(ValueError):
    """The input cannot be converted; the message says why."""


@dataclass
class LayerPlan:
    keep: np.ndarray  # int: dense indices of the kept neurons, hot-first
    up_absmean: np.ndarray  # float32 per kept neuron: mean |up_i . x| on calibration text
    # sampled inputs h of the down projection [S, len(keep)], kept neurons in plan order:
    # requantized ffn_down_t rows then minimise the error of h @ ffn_down_t, not their own
    down_input: np.ndarray | None = field(default=None, repr=False)


@dataclass
class SparsePlan:
    layers: list[LayerPlan]
    # extra sparse.* keys (tables, calibration, ...); typed by add_metadata
    metadata: dict[str, Any] = field(default_factory=dict)
    down_type: QT | None = None  # None: the input's type when it fits (see DOWN_T_FALLBACK)
    # point 2 scores plain |act(g)| (allocation cats): ffn_up_absmean is written as
    # 1 / ffn_down_norm instead of the layers' up_absmean
    plain_gate: bool = False
    # the last requantized ffn_down_t per layer, (type, raw rows): a rewrite in the same
    # type (pipeline.write_checked) does not compensate again
    down_t_cache: dict[int, tuple[QT, np.ndarray]] = field(default_factory=dict, repr=False)


@dataclass
class DenseModel:
    """What the converter needs to know of a dense GGUF."""

    path: Path
    reader: GGUFReader
    arch: str
    n_layer: int
    n_embd: int
    n_ff: list[int]

    tensors: dict[str, Any] = field(default_factory=dict)  # name -> ReaderTensor

    def tensor(self, name: str) -> Any:
        try:
            return self.tensors[name]
        except KeyError:
            raise ConvertError(f"{self.path}: tensor {name} is missing") from None


def read_gguf(path: Path) -> GGUFReader:
    """A reader for `path`, or a ConvertError saying why there is none."""
    if not path.is_file():
        raise ConvertError(f"input not found: {path}")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ConvertError(f"{path} is not a GGUF file")
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:  # gguf raises these on short or bad data
        raise ConvertError(f"{path} is truncated or damaged: {e}") from None


def open_dense(path: Path) -> DenseModel:
    """Read and check a dense GGUF: exists, is GGUF, supported architecture, gated FFN."""
    path = Path(path)
    reader = read_gguf(path)

    def key(name: str) -> Any:
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    if key("sparse.format_version") is not None:
        raise ConvertError(f"{path} is already a sparse GGUF")
    arch = key("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ConvertError(
            f"{path}: architecture {arch!r} is not supported; llama-sparse converts "
            f"gated-FFN models of the architectures {', '.join(SUPPORTED_ARCHS)}"
        )
    n_layer, n_embd = key(f"{arch}.block_count"), key(f"{arch}.embedding_length")
    n_ff = key(f"{arch}.feed_forward_length")
    n_ff = list(n_ff) if isinstance(n_ff, list) else [n_ff] * n_layer
    tensors = {t.name: t for t in reader.tensors}
    names = tensors.keys()
    for il in range(n_layer):
        if f"blk.{il}.ffn_gate_exps.weight" in names:
            raise ConvertError(f"{path}: mixture-of-experts FFNs are not supported")
        for m in ("gate", "up", "down"):
            if f"blk.{il}.ffn_{m}.weight" not in names:
                raise ConvertError(f"{path}: layer {il} has no ffn_{m} (not a gated FFN)")
    return DenseModel(path, reader, arch, n_layer, n_embd, n_ff, tensors)


def identity_plan(model: DenseModel) -> SparsePlan:
    """Keep every neuron in dense order; up_absmean 1 (no calibration): for tests."""
    return SparsePlan(
        [LayerPlan(np.arange(n, dtype=np.int32), np.ones(n, dtype=np.float32)) for n in model.n_ff]
    )


def _row_bytes(qtype: QT, n_per_row: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    if n_per_row % block:
        raise ConvertError(f"rows of {n_per_row} do not fit {qtype.name} blocks of {block}")
    return n_per_row // block * size


def quantize_rows(rows: np.ndarray, qtype: QT) -> np.ndarray:
    """Quantize float32 rows (n_rows, n_per_row) with ggml; raw bytes (n_rows, row_bytes)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if qtype == QT.F32:
        return rows
    n_rows, n_per_row = rows.shape
    out = np.empty((n_rows, _row_bytes(qtype, n_per_row)), dtype=np.uint8)
    written = ggml_base().ggml_quantize_chunk(
        int(qtype), rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, None
    )
    if written != out.nbytes:
        raise ConvertError(f"ggml_quantize_chunk({qtype.name}) wrote {written} of {out.nbytes}")
    return out


def quantize_rows_compensated(
    rows: np.ndarray,
    qtype: QT,
    inputs: np.ndarray,
    *,
    damp: float = COMPENSATE_DAMP,
    block: int = COMPENSATE_BLOCK,
    group: int = COMPENSATE_GROUP,
) -> np.ndarray:
    """Quantize the rows of W (n, d), the right factor of y = h @ W, so that y's error over
    the sampled inputs h (S, n) is small rather than each row's own: row i is rounded by
    ggml, and its error is carried into rows i+1.. through the Cholesky factor of the
    inverse of H = h^T h / S (GPTQ, Frantar et al. 2022, arXiv:2210.17323, with rows in
    the role of its columns), in groups of at most `group` rows. Raw bytes (n, row_bytes)
    as quantize_rows returns them."""
    n = len(rows)
    x = np.asarray(inputs, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n or len(x) == 0:
        raise ConvertError(f"compensation inputs have shape {x.shape}, want (S, {n})")
    if n > group:
        return np.concatenate([
            quantize_rows_compensated(rows[i : i + group], qtype, x[:, i : i + group],
                                      damp=damp, block=block, group=group)
            for i in range(0, n, group)
        ])  # fmt: skip
    w = np.array(rows, dtype=np.float32, order="C")
    hess = x.T @ x / np.float32(len(x))
    mean_diag = float(np.mean(np.diag(hess)))
    if not mean_diag > 0:
        return quantize_rows(rows, qtype)  # no input ever reached these rows
    hess[np.diag_indices(n)] += damp * mean_diag  # well conditioned enough for float32
    u = np.linalg.cholesky(np.linalg.inv(hess)).T  # upper: H^-1 = u^T u
    lib = ggml_base()
    to_float = lib.ggml_get_type_traits(int(qtype)).contents.to_float
    out = np.empty((n, _row_bytes(qtype, w.shape[1])), dtype=np.uint8)
    back = np.empty(w.shape[1], dtype=np.float32)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        err = np.empty((i2 - i1, w.shape[1]), dtype=np.float32)
        for i in range(i1, i2):
            q = out[i].ctypes.data
            lib.ggml_quantize_chunk(int(qtype), w[i].ctypes.data, q, 0, 1, len(back), None)
            to_float(q, back.ctypes.data, len(back))
            err[i - i1] = (w[i] - back) / u[i, i]
            w[i + 1 : i2] -= np.outer(u[i, i + 1 : i2], err[i - i1])
        w[i2:] -= u[i1:i2, i2:].T @ err
    return out


def down_t_type(src: QT, n_embd: int, wanted: QT | None) -> tuple[QT, str]:
    """Type for ffn_down_t rows of length n_embd, and why."""
    if wanted is not None:
        return wanted, f"{wanted.name} requested"
    if src in LOSSLESS:
        return src, f"{src.name}, transposed losslessly"
    if n_embd % GGML_QUANT_SIZES[src][0] == 0 and not ggml_base().ggml_quantize_requires_imatrix(
        int(src)
    ):
        return src, f"{src.name}, requantized"
    wider = DOWN_T_FALLBACK.get(src, QT.Q8_0)
    if n_embd % GGML_QUANT_SIZES[wider][0]:
        wider = QT.F16
    return wider, f"{wider.name}: rows of {n_embd} do not fit {src.name} blocks"


def pack_signs(rows: np.ndarray) -> np.ndarray:
    """Bit b of word w of row i is 1 iff rows[i, 32 w + b] < 0; padding bits 0."""
    n_rows, n = rows.shape
    bits = np.zeros((n_rows, -(-n // 32) * 32), dtype=bool)
    bits[:, :n] = rows < 0
    return np.packbits(bits, axis=1, bitorder="little").view("<u4").astype(np.int32)


# --- writing ------------------------------------------------------------------


def copy_field(writer: GGUFWriter, name: str, f: Any) -> None:
    """Copy a GGUFReader field, with its exact value type, into a writer."""
    sub = f.types[1] if f.types[0] == GGUFValueType.ARRAY else None
    writer.add_key_value(name, f.contents(), f.types[0], sub_type=sub)


def _copy_metadata(model: DenseModel, writer: GGUFWriter) -> None:
    skip = {"general.architecture", f"{model.arch}.feed_forward_length"}
    for name, f in model.reader.fields.items():
        if not name.startswith("GGUF.") and name not in skip:
            copy_field(writer, name, f)


def _check_plan(model: DenseModel, plan: SparsePlan) -> None:
    if len(plan.layers) != model.n_layer:
        raise ConvertError(f"plan has {len(plan.layers)} layers, the model {model.n_layer}")
    for il, (lp, n) in enumerate(zip(plan.layers, model.n_ff, strict=True)):
        k = np.asarray(lp.keep)
        if k.ndim != 1 or len(k) == 0 or len(np.unique(k)) != len(k) or k.min() < 0 or k.max() >= n:
            raise ConvertError(f"layer {il}: keep must be distinct indices in [0, {n})")
        if np.shape(lp.up_absmean) != k.shape:
            raise ConvertError(f"layer {il}: up_absmean has shape {np.shape(lp.up_absmean)}")


Tensor = tuple[str, np.ndarray, QT | None]  # name, data, raw ggml type (None: numpy dtype)


def add_metadata(writer: GGUFWriter, name: str, value: Any) -> None:
    """int -> u32, float -> f32, str, and 1-d arrays or lists of those."""
    if isinstance(value, str):
        writer.add_string(name, value)
        return
    arr = np.asarray(value)
    if arr.dtype.kind not in "uif" or arr.ndim > 1:
        raise TypeError(f"{name}: unsupported metadata value {value!r}")
    vtype = GGUFValueType.UINT32 if arr.dtype.kind in "ui" else GGUFValueType.FLOAT32
    if arr.ndim == 0:
        writer.add_key_value(name, arr.item(), vtype)
    else:
        writer.add_key_value(name, arr.tolist(), GGUFValueType.ARRAY, sub_type=vtype)


def _layer_tensors(
    model: DenseModel, il: int, lp: LayerPlan, plan: SparsePlan
) -> tuple[list[Tensor], str]:
    """Layer il's FFN in sparse form, and why ffn_down_t has its type."""
    keep = np.asarray(lp.keep, dtype=np.int64)
    out: list[Tensor] = []
    for m in ("gate", "up"):
        t = model.tensor(f"blk.{il}.ffn_{m}.weight")
        out.append((t.name, np.ascontiguousarray(t.data[keep]), t.tensor_type))
        if f"blk.{il}.ffn_{m}.bias" in model.tensors:
            b = model.tensor(f"blk.{il}.ffn_{m}.bias")
            out.append((b.name, np.ascontiguousarray(b.data[keep]), None))
    down = model.tensor(f"blk.{il}.ffn_down.weight")
    qtype, reason = down_t_type(down.tensor_type, model.n_embd, plan.down_type)
    down_t = dequantize(down.data, down.tensor_type).reshape(model.n_embd, -1)[:, keep].T
    if qtype in LOSSLESS or lp.down_input is None:
        raw = quantize_rows(down_t, qtype)
    elif il in plan.down_t_cache and plan.down_t_cache[il][0] == qtype:
        raw = plan.down_t_cache[il][1]
    else:
        raw = quantize_rows_compensated(down_t, qtype, lp.down_input)
        plan.down_t_cache[il] = (qtype, raw)
    stored = dequantize(raw, qtype).reshape(len(keep), model.n_embd)
    down_norm = np.linalg.norm(stored, axis=1).astype(np.float32)
    if plan.plain_gate:  # a zero row contributes nothing: score 0, always skipped
        up_absmean = np.divide(1.0, down_norm, out=np.zeros_like(down_norm), where=down_norm > 0)
    else:
        up_absmean = np.asarray(lp.up_absmean, dtype=np.float32)
    gate = model.tensor(f"blk.{il}.ffn_gate.weight")
    g = dequantize(gate.data[keep], gate.tensor_type).reshape(len(keep), model.n_embd)
    out += [
        (f"blk.{il}.ffn_down_t.weight", raw, qtype),
        (f"blk.{il}.ffn_gate_sign", pack_signs(g), None),
        (f"blk.{il}.ffn_neuron_index", keep.astype(np.int32), None),
        (f"blk.{il}.ffn_down_norm", down_norm, None),
        (f"blk.{il}.ffn_up_absmean", up_absmean, None),
    ]
    return out, reason


def write_sparse(src: Path, dst: Path, plan: SparsePlan, *, progress: bool = True) -> Path:
    """Write the sparse GGUF for `plan` to dst, atomically; never over src."""
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve() or (dst.exists() and os.path.samefile(src, dst)):
        raise ConvertError(f"refusing to write over the input {src}")
    model = open_dense(src)
    _check_plan(model, plan)
    reasons: dict[str, list[int]] = {}

    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp makes it 0600; the result is an ordinary file
    writer: GGUFWriter | None = None
    try:
        writer = GGUFWriter(tmp, model.arch)
        if "general.alignment" in model.reader.fields:
            writer.data_alignment = int(model.reader.fields["general.alignment"].contents())
        _copy_metadata(model, writer)
        widths = np.array([len(lp.keep) for lp in plan.layers], dtype=np.uint32)
        for name, value in {
            f"{model.arch}.feed_forward_length": widths,
            "sparse.format_version": np.uint32(FORMAT_VERSION),
            "sparse.method": f"llama-sparse-convert {__version__}",
            "sparse.activation": SUPPORTED_ARCHS[model.arch],
            "sparse.original_ff_length": np.array(model.n_ff, dtype=np.uint32),
            "sparse.dead_neurons": np.array(model.n_ff, dtype=np.uint32) - widths,
            **plan.metadata,
        }.items():
            add_metadata(writer, name, value)
        ffn = {f"blk.{il}.ffn_{m}.{s}" for il in range(model.n_layer)
               for m in ("gate", "up", "down") for s in ("weight", "bias")}  # fmt: skip
        layers = tqdm(total=model.n_layer, desc="sparse FFN layers", disable=not progress)
        for t in model.reader.tensors:
            if t.name not in ffn:
                writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
                continue
            il = int(t.name.split(".")[1])
            if t.name == f"blk.{il}.ffn_down.bias":
                writer.add_tensor(t.name, t.data)
            if t.name != f"blk.{il}.ffn_down.weight":
                continue  # the layer's FFN is written once, at its down tensor
            tensors, reason = _layer_tensors(model, il, plan.layers[il], plan)
            reasons.setdefault(reason, []).append(il)
            layers.update()
            for name, data, qtype in tensors:
                if qtype is None:
                    writer.add_tensor(name, data)
                else:
                    writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        layers.close()
        if "sparse.down_t.reason" not in plan.metadata:  # the converter may know better why
            writer.add_string(
                "sparse.down_t.reason",
                "; ".join(
                    f"{r} (layers {', '.join(map(str, sorted(ls)))})" for r, ls in reasons.items()
                ),
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException as e:
        if writer is not None and writer.fout is not None:
            for f in writer.fout:
                try:
                    f.close()
                except OSError:  # flushing into a full disk fails again
                    pass
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(dst, e) from e
        raise
    return dst


def _write_error(dst: Path, e: OSError) -> ConvertError:
    free = shutil.disk_usage(dst.parent).free
    return ConvertError(
        f"cannot write {dst}: {e.strerror or e}; {free / 2**20:.1f} MiB free in {dst.parent} "
        "(nothing was left behind)"
    )
