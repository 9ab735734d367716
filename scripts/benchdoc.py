"""The benchmark scripts' shared part: each rewrites its own section of docs/BENCHMARKS.md."""

from __future__ import annotations

import platform
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def write_section(name: str, section: str) -> None:
    """Put `section` between the `<!-- name:begin -->` and `<!-- name:end -->`
    markers of docs/BENCHMARKS.md, appending them at the end the first time."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)


# AVX-512 extensions the sparse kernels use, as /proc/cpuinfo spells them
_AVX512_EXT = [("avx512_vnni", "VNNI"), ("avx512vbmi", "VBMI"), ("avx512_vpopcntdq", "VPOPCNTDQ")]


def machine() -> str:
    """The CPU a section was measured on, as its header names it: architecture, model and the
    widest vector extensions the kernels use (AVX-512 and which of its extensions, or AVX2)."""
    arch = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return arch
    fields = dict(
        (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in info.splitlines()) if v
    )
    name = fields.get("model name", "")
    flags = set(fields.get("flags", "").split())
    if "avx512f" in flags:
        ext = [e for f, e in _AVX512_EXT if f in flags]
        isa = "AVX-512" + (f" with {', '.join(ext)}" if ext else "")
    elif "avx2" in flags:
        isa = "AVX2"
    else:
        isa = ""
    detail = "; ".join(p for p in (name, isa) if p)
    return f"{arch} ({detail})" if detail else arch
