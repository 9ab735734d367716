"""Default calibration and evaluation text: real prose that ships with Python.

Source: the ``pydoc_data.topics`` module of the Python standard library
(``pydoc_data/topics.py``), the "help topics" of the Python Language
Reference that ``pydoc`` shows for ``help("if")`` and friends. It is real
English technical prose with embedded code, written by the CPython
documentation authors (PSF licensed), present in every CPython installation,
so it is available offline wherever the converter runs. Nothing in it was
written for llama-sparse.

The 79 topics (about 465,000 characters, roughly 100,000 tokens for
SmolLM2's tokenizer, in Python 3.11) are sorted by name and split by
alternating index: even positions form the calibration text, odd positions
the evaluation text, so both cover the same kind of material. Topics repeat
some passages (shared explanations, examples), so the evaluation text then
drops every paragraph (block between blank lines) that also occurs in the
calibration text: the two share no paragraph (a few headings and stock
sentences inside otherwise different paragraphs remain). Calibration keeps
about 250,000 characters (~60k SmolLM2 tokens), evaluation about 158,000
(~35k tokens), both far more than the 16k tokens calibration needs.

The exact text depends on the Python version; the source description says
which one was used, and it is what the converter writes into
``sparse.calibration.source``.
"""

from __future__ import annotations

import platform


def _topics() -> list[tuple[str, str]]:
    from pydoc_data import topics

    return sorted(topics.topics.items())


def _paragraphs(parts: list[tuple[str, str]]) -> list[str]:
    return [p.strip() for _, text in parts for p in text.split("\n\n") if p.strip()]


def _source(which: str, extra: str = "") -> str:
    return (
        f"Python {platform.python_version()} stdlib pydoc_data/topics.py, "
        f"{which} topics (sorted by name){', ' + extra if extra else ''}"
    )


def calibration_text() -> tuple[str, str]:
    """The default calibration text and a description of its source."""
    return "\n\n".join(_paragraphs(_topics()[0::2])) + "\n", _source("even-indexed")


def evaluation_text() -> tuple[str, str]:
    """The default evaluation text (disjoint from calibration) and its source."""
    topics = _topics()
    seen = set(_paragraphs(topics[0::2]))
    kept = [p for p in _paragraphs(topics[1::2]) if p not in seen]
    return "\n\n".join(kept) + "\n", _source(
        "odd-indexed", "without paragraphs that also occur in the calibration text"
    )
