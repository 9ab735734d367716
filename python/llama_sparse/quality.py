"""Quality measurements with our llama-perplexity: perplexity, KL divergence, top-1 agreement.

Both models are run by the same bundled tool on the same text and context
size, so a difference comes from the models (or the sparsity), not the
harness. The dense model's logits are kept in a `--kl-divergence-base` file
and each candidate is compared with them token by token.
"""

from __future__ import annotations

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

    @property
    def ppl_change(self) -> float:
        """Relative perplexity change, e.g. 0.004 for +0.4 %."""
        return self.ppl / self.ppl_base - 1.0


class QualityError(RuntimeError):
    pass


def _run(args: list[str]) -> str:
    proc = subprocess.run(
        [str(tool("llama-perplexity")), *args], capture_output=True, text=True, check=False
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise QualityError(f"llama-perplexity {' '.join(args)} failed:\n{out[-3000:]}")
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
    with tempfile.TemporaryDirectory() as tmp:
        kld_base = Path(tmp) / "base.kld"
        common = ["-c", str(ctx), "-t", str(threads)]
        _run(["-m", str(base), "-f", str(text), "--kl-divergence-base", str(kld_base), *common])
        results = []
        for model, extra in runs:
            out = _run(["-m", str(model), "--kl-divergence-base", str(kld_base),
                        "--kl-divergence", *common, *extra])  # fmt: skip
            results.append(
                Quality(
                    ppl=_number(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", out),
                    ppl_base=_number(r"Mean PPL\(base\)\s*:\s*([0-9.]+)", out),
                    mean_kld=_number(r"Mean\s+KLD:\s*(-?[0-9.]+)", out),
                    top1=_number(r"Same top p:\s*([0-9.]+)", out) / 100.0,
                )
            )
    return results
