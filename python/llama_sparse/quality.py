"""Quality measurements with our llama-perplexity: perplexity, KL divergence, top-1 agreement.

Both models are run by the same bundled tool on the same text and context
size, so a difference comes from the models (or the sparsity), not the
harness. The dense model's logits are kept in a `--kl-divergence-base` file
and each candidate is compared with them token by token.
"""

from __future__ import annotations

import math
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ._paths import tool


@dataclass(frozen=True)
class Quality:
    ppl: float  # perplexity of the candidate
    ppl_base: float  # perplexity of the base (dense) model
    mean_kld: float  # mean KL divergence base -> candidate, per token
    top1: float  # fraction of tokens whose most likely next token is the same
    ln_ratio_unc: float = 0.0  # standard error of ln(ppl / ppl_base) over the text's tokens

    @property
    def ppl_change(self) -> float:
        """Relative perplexity change, e.g. 0.004 for +0.4 %."""
        return self.ppl / self.ppl_base - 1.0

    @property
    def ppl_change_2se(self) -> float:
        """Two standard errors of ppl_change: how much it could move on another text of
        the same length (the noise of the measurement, not of the model)."""
        return self.ppl / self.ppl_base * (math.exp(2.0 * self.ln_ratio_unc) - 1.0)


class QualityError(RuntimeError):
    pass


def _run(args: list[str]) -> str:
    proc = subprocess.run(
        [str(tool("llama-perplexity")), *args],
        capture_output=True,
        encoding="utf-8",  # it prints "±"
        errors="replace",
        check=False,
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise QualityError(f"llama-perplexity {' '.join(args)} failed:\n{out[-3000:]}")
    # a text shorter than two contexts: llama-perplexity says so, computes nothing and exits 0
    short = re.search(r"need at least (\d+) tokens to evaluate perplexity with a context of (\d+)",
                      out)  # fmt: skip
    if short:
        have = re.search(r"tokenizes to only (\d+) tokens", out)
        raise QualityError(
            f"the text is too short for llama-perplexity: {have.group(1) if have else 'too few'} "
            f"tokens, where a context of {short.group(2)} needs at least {short.group(1)}; "
            "give a longer text or a smaller context"
        )
    return out


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    if not m:
        raise QualityError(f"llama-perplexity printed no {pattern!r}:\n{text[-3000:]}")
    return float(m.group(1))


def perplexity(model: Path, text: Path, *, ctx: int = 512, threads: int = 2,
               extra: tuple[str, ...] = ()) -> float:  # fmt: skip
    out = _run(["-m", str(model), "-f", str(text), "-c", str(ctx), "-t", str(threads), *extra])
    return _number(r"Final estimate: PPL = ([0-9.]+)", out)


def compare(base: Path, candidates: list[Path], text: Path, *, ctx: int = 512, threads: int = 2,
            extra: tuple[str, ...] = ()) -> list[Quality]:  # fmt: skip
    """Quality of each candidate against the base model on `text`."""
    return compare_runs(base, [(c, extra) for c in candidates], text, ctx=ctx, threads=threads)


def compare_runs(base: Path, runs: list[tuple[Path, tuple[str, ...]]], text: Path, *,
                 ctx: int = 512, threads: int = 2) -> list[Quality]:  # fmt: skip
    """Quality of each (model, extra llama-perplexity flags) run against `base` on `text`."""
    with Reference(base, text, ctx=ctx, threads=threads) as ref:
        return [ref.compare(model, extra) for model, extra in runs]


class Reference:
    """The base model's logits on `text`, kept while the context is open, so that
    candidates written one after the other are compared with one base run."""

    def __init__(self, base: Path, text: Path, *, ctx: int = 512, threads: int = 2) -> None:
        self.base, self.text = base, text
        self.common = ["-c", str(ctx), "-t", str(threads)]
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Reference:
        self._tmp = tempfile.TemporaryDirectory()
        self.kld_base = Path(self._tmp.name) / "base.kld"
        _run(["-m", str(self.base), "-f", str(self.text), "--kl-divergence-base",
              str(self.kld_base), *self.common])  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._tmp is not None
        self._tmp.cleanup()

    def compare(self, model: Path, extra: tuple[str, ...] = ()) -> Quality:
        out = _run(["-m", str(model), "--kl-divergence-base", str(self.kld_base),
                    "--kl-divergence", *self.common, *extra])  # fmt: skip
        ln_ratio = r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*-?[0-9.]+\s*±\s*([0-9.]+)"
        return Quality(
            ppl=_number(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", out),
            ppl_base=_number(r"Mean PPL\(base\)\s*:\s*([0-9.]+)", out),
            mean_kld=_number(r"Mean\s+KLD:\s*(-?[0-9.]+)", out),
            top1=_number(r"Same top p:\s*([0-9.]+)", out) / 100.0,
            ln_ratio_unc=_number(ln_ratio, out),
        )
