#!/usr/bin/env python3
"""Server load test: concurrent OpenAI-API clients against the bundled llama-server.

    python scripts/bench_server.py [-m MODEL] [--clients 8] [--requests 200]
                                   [--max-tokens 32] [--sparsity none,0.5] [-t 2] [--no-doc]

For each setting of --sparsity (none: requests without "sparsity", the
server's level 0, dense; a level: every request asks for it), starts
llama-server on loopback (one slot per client), sends a fixed number of
requests from concurrent clients (threads with the openai client), half chat
completions and half text completions, all streamed, on short prompts cut from
the evaluation text (real prose, available offline), then stops the server.
Every request must succeed: the exit status is 1 when any failed.

Prints one table with a column per setting: requests, errors, wall time,
requests/s, generated tokens/s (all clients together), latency and
time-to-first-token percentiles, the server's own decode speed and the
sparsity it measured, and the ideal decode speedup for that sparsity (weight
bytes a token reads, dense over sparse); rewrites its section of
docs/BENCHMARKS.md. The default model is the sparse SmolLM2 that
scripts/bench_sparse.py converts and caches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchdoc
import numpy as np
from bench_sparse import sparse_model, weight_bytes
from openai import OpenAI
from tqdm import tqdm

from llama_sparse import models
from llama_sparse.convert.text import evaluation_text
from llama_sparse.server import ServerError, http_get, serve

START_TIMEOUT = 300.0


# --- the server -------------------------------------------------------------------


@contextlib.contextmanager
def server(model: Path, args: argparse.Namespace) -> Iterator[str]:
    """llama-server on a free loopback port, one slot per client; yields its base URL."""
    flags = ["--metrics", "-np", str(args.clients), "-c", str(args.clients * args.slot_ctx),
             "-t", str(args.threads)]  # fmt: skip
    try:
        with serve(model, *flags, timeout=START_TIMEOUT) as s:
            yield s.url
    except ServerError as e:
        raise RuntimeError(str(e)) from None


def metric(url: str, name: str) -> float | None:
    """A sample of the server's /metrics, by name."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = http_get(url + "/metrics")
    if status != 200:
        return None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                return float(s.value)
    return None


# --- the clients ------------------------------------------------------------------


def prompts(n: int) -> list[str]:
    """`n` varied short prompts: the opening sentences of evaluation-text paragraphs."""
    text, _ = evaluation_text()
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    prose = [p for p in paras if 80 <= len(p) <= 2000 and p[0].isalpha() and "::" not in p]
    step = max(1, len(prose) // n)
    out = []
    for p in prose[::step][:n]:
        cut = p[:240]
        out.append(cut[: cut.rfind(" ")] if len(p) > 240 else p)
    return out


@dataclass
class Result:
    kind: str
    latency: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    sparsity: float | None = None
    error: str | None = None


_local = threading.local()


def client(base: str) -> OpenAI:
    """One openai client per thread and server."""
    clients: dict[str, OpenAI] = _local.__dict__.setdefault("clients", {})
    if base not in clients:
        clients[base] = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=600)
    return clients[base]


def one_request(
    base: str, model: str, i: int, prompt: str, level: float | None, args: argparse.Namespace
) -> Result:
    kind = "chat" if i % 2 == 0 else "completion"
    r = Result(kind)
    extra = {} if level is None else {"sparsity": level}
    t0 = time.perf_counter()
    try:
        c = client(base)
        if kind == "chat":
            stream: Any = c.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"Explain briefly: {prompt}"}],
                max_tokens=args.max_tokens,
                stream=True,
                extra_body=extra,
            )
        else:
            stream = c.completions.create(
                model=model, prompt=prompt, max_tokens=args.max_tokens, stream=True,
                extra_body=extra,
            )  # fmt: skip
        text = []
        for chunk in stream:
            if chunk.choices:
                piece = chunk.choices[0].delta.content if kind == "chat" else chunk.choices[0].text
                if piece:
                    if r.ttft is None:
                        r.ttft = time.perf_counter() - t0
                    text.append(piece)
            timings = (chunk.model_extra or {}).get("timings")
            if timings:
                r.tokens = int(timings["predicted_n"])
                r.sparsity = timings.get("sparsity")
        r.latency = time.perf_counter() - t0
        if not "".join(text).strip():
            r.error = "empty reply"
        elif r.tokens == 0:
            r.error = "no timings in the final chunk"
    except Exception as e:  # every failure counts, whatever it is
        r.error = f"{type(e).__name__}: {e}"
    return r


def run(
    args: argparse.Namespace, model: Path, level: float | None
) -> tuple[list[Result], float, dict[str, Any]]:
    texts = prompts(64)
    with server(model, args) as base:
        _, body = http_get(base + "/v1/models")
        model_id = json.loads(body)["data"][0]["id"]
        warm = one_request(base, model_id, 0, texts[0], level, args)  # load pages, fill caches
        if warm.error:
            raise RuntimeError(f"warm-up request failed: {warm.error}")
        results: list[Result] = []
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.clients) as pool:
            futures = [
                pool.submit(one_request, base, model_id, i, texts[i % len(texts)], level, args)
                for i in range(args.requests)
            ]
            for f in tqdm(as_completed(futures), total=len(futures), unit="req"):
                results.append(f.result())
        wall = time.perf_counter() - t0
        server_side = {
            "decode": metric(base, "llamacpp:predicted_tokens_seconds"),
            "sparsity": metric(base, "llamacpp:sparse_sparsity"),
        }
    return results, wall, server_side


# --- the report -------------------------------------------------------------------


def pct(values: list[float]) -> str:
    if not values:
        return "n/a"
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return f"{p50:.2f} / {p90:.2f} / {p99:.2f}"


def column(
    results: list[Result],
    wall: float,
    server_side: dict[str, Any],
    bytes_: tuple[float, float, float],
) -> list[tuple[str, str]]:
    """One setting's (measure, value) rows."""
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    weighted = [(r.sparsity, r.tokens) for r in ok if r.sparsity is not None]
    achieved = (
        sum(s * n for s, n in weighted) / sum(n for _, n in weighted)
        if weighted and sum(n for _, n in weighted)
        else None
    )
    rows = [
        ("requests (chat / completion)", f"{len(results)} ({sum(r.kind == 'chat' for r in results)}"
         f" / {sum(r.kind == 'completion' for r in results)})"),
        ("errors", str(len(results) - len(ok))),
        ("wall time", f"{wall:.1f} s"),
        ("requests/s", f"{len(results) / wall:.2f}"),
        ("generated tokens", str(tokens)),
        ("generated tokens/s (all clients)", f"{tokens / wall:.1f}"),
        ("latency p50 / p90 / p99", f"{pct([r.latency for r in ok])} s"),
        ("time to first token p50 / p90 / p99",
         f"{pct([r.ttft for r in ok if r.ttft is not None])} s"),
    ]  # fmt: skip
    if server_side.get("decode") is not None:
        rows.append(("server decode tokens/s per slot (/metrics)", f"{server_side['decode']:.1f}"))
    if achieved is not None:
        rows.append(("FFN sparsity achieved (request timings)", f"{achieved:.3f}"))
    if server_side.get("sparsity") is not None:
        rows.append(("FFN sparsity achieved (/metrics)", f"{server_side['sparsity']:.3f}"))
        # against the same file without "sparsity"; threshold mode reads no sign bits
        total, ffn, _ = bytes_
        ideal = total / (total - server_side["sparsity"] * ffn)
        rows.append(("ideal decode speedup for that sparsity", f"{ideal:.2f}"))
    return rows


def table(labels: list[str], columns: list[list[tuple[str, str]]]) -> str:
    measures = list(dict.fromkeys(k for col in columns for k, _ in col))
    lines = ["| measure | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for m in measures:
        values = [dict(col).get(m, "") for col in columns]
        lines.append(f"| {m} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def settings(text: str) -> list[float | None]:
    """--sparsity: comma-separated levels, `none` for requests without one."""
    try:
        return [None if v.strip() == "none" else float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of levels and `none`: {text}") from None


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None,
                    help="GGUF file or known model name (default: the sparse SmolLM2 of "
                    "scripts/bench_sparse.py, converted and cached the first time)")  # fmt: skip
    ap.add_argument("--clients", type=positive_int, default=8,
                    help="concurrent clients, and server slots (default: 8)")  # fmt: skip
    ap.add_argument("--requests", type=positive_int, default=200,
                    help="requests in total (default: 200)")  # fmt: skip
    ap.add_argument("--max-tokens", type=positive_int, default=32,
                    help="max_tokens of each request (default: 32)")  # fmt: skip
    ap.add_argument("--sparsity", type=settings, default=[None, 0.5],
                    help="settings to measure, comma-separated: none (requests without "
                    "\"sparsity\": dense) or a level of the model's table "
                    "(default: none,0.5)")  # fmt: skip
    ap.add_argument("-t", "--threads", type=positive_int, default=2,
                    help="server threads (default: 2)")  # fmt: skip
    ap.add_argument("--slot-ctx", type=positive_int, default=1024,
                    help="context per slot; -c is clients times this (default: 1024)")  # fmt: skip
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/BENCHMARKS.md")
    args = ap.parse_args()

    if args.model is None:
        model = sparse_model(models.resolve(models.DEFAULT_MODEL), args.threads)
    else:
        model = models.resolve(args.model)
    bytes_ = weight_bytes(model)
    labels, columns, errors = [], [], []
    for level in args.sparsity:
        try:
            results, wall, server_side = run(args, model, level)
        except RuntimeError as e:
            print(f"bench_server: error: {e}", file=sys.stderr)
            return 1
        labels.append('dense (no "sparsity")' if level is None else f'"sparsity": {level:g}')
        columns.append(column(results, wall, server_side, bytes_))
        errors += [r.error for r in results if r.error is not None]
    tab = table(labels, columns)
    for msg in sorted(set(errors))[:10]:
        print(f"error: {msg}", file=sys.stderr)
    head = (
        f"{model.name}, {args.clients} clients / slots, {args.requests} requests per setting "
        f"(streamed, max_tokens {args.max_tokens}), server threads {args.threads}, "
        f"{benchdoc.machine()}"
    )
    print(f"\n{head}\n{tab}")
    if not args.no_doc:
        cmd = " ".join(["python scripts/bench_server.py", *sys.argv[1:]])
        benchdoc.write_section(
            "bench_server",
            f"Server load test, made by `{cmd}`: {head}. Latency and time to first token are "
            f"per request, as a client sees them.\n\n{tab}",
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
