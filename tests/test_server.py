"""The bundled llama-server on loopback, driven by the openai client (issue 6).

Two servers run for the whole module, started as a user starts them
(`llama-sparse server ... --metrics -np 2 -c 4096`): one on the sparse SmolLM2,
one on the dense SmolLM2. Requests stay short (8-32 tokens).
"""

from __future__ import annotations

import json
import subprocess
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from llama_sparse.convert.text import evaluation_text
from llama_sparse.server import Server, ServerError, http_get, serve

QUESTION = "What is the capital of France?"


@dataclass
class Client:
    """A running server, as the tests talk to it."""

    server: Server
    model_id: str

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.server.proc

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=300)

    def request(
        self, path: str, body: dict[str, Any] | bytes | None = None
    ) -> tuple[int, dict[str, Any] | str]:
        """Status and body (JSON when it parses) of a GET (body None) or a POST."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        text = raw.decode("utf-8", errors="replace")
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def log_tail(self) -> str:
        return self.server.log_tail()


def start(model: Path, log: Path, *extra: str) -> Iterator[Client]:
    """The server as a user starts it: `llama-sparse server ...`."""
    exe = Path(sysconfig.get_path("scripts")) / "llama-sparse"
    flags = ["--metrics", "-np", "2", "-c", "4096", "-t", "2", *extra]
    try:
        with serve(model, *flags, command=[str(exe), "server"], log=log, timeout=120) as server:
            status, models = http_get(server.url + "/v1/models")
            assert status == 200, models
            yield Client(server, json.loads(models)["data"][0]["id"])
    except ServerError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def sparse_server(
    sparse_smollm2: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Client]:
    yield from start(sparse_smollm2, tmp_path_factory.mktemp("server") / "sparse.log")


@pytest.fixture(scope="module")
def dense_server(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    log = tmp_path_factory.mktemp("server") / "dense.log"
    yield from start(smollm2, log, "--alias", "smollm2-dense")


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, **extra}


def assert_serves(server: Client) -> None:
    """A normal request (no "model": fine too) gets a normal answer."""
    status, body = server.request("/v1/chat/completions", chat_body())
    assert status == 200, (body, server.log_tail())
    assert isinstance(body, dict) and body["choices"][0]["message"]["content"].strip()
    assert server.proc.poll() is None


def metrics(server: Client) -> dict[str, tuple[str, float]]:
    """/metrics as {sample name: (family type, value)}, parsed by prometheus_client."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {
        s.name: (family.type, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# --- requests that work -------------------------------------------------------------


def test_chat_completion(sparse_server: Client) -> None:
    resp = sparse_server.client().chat.completions.create(
        model=sparse_server.model_id,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=16,
        temperature=0.0,
    )
    assert resp.choices[0].message.role == "assistant"
    assert (resp.choices[0].message.content or "").strip()
    assert resp.choices[0].finish_reason in ("stop", "length")
    u = resp.usage
    assert u is not None and u.prompt_tokens > 5 and 0 < u.completion_tokens <= 16
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    timings = (resp.model_extra or {})["timings"]
    assert timings["predicted_n"] == u.completion_tokens and timings["predicted_per_second"] > 0
    # no "sparsity" in the request: the server's level, 0 (dense)
    assert timings["sparsity"] == 0.0 and timings["sparse_level"] == 0.0


def test_streaming_chat(sparse_server: Client) -> None:
    stream = sparse_server.client().chat.completions.create(
        model=sparse_server.model_id,
        messages=[{"role": "user", "content": "Name three colors."}],
        max_tokens=24,
        temperature=0.0,
        stream=True,
    )
    chunks = list(stream)
    texts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for t in texts if t) >= 3, chunks
    assert "".join(texts).strip()
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish and finish[-1] in ("stop", "length")


def test_completion(sparse_server: Client) -> None:
    resp = sparse_server.client().completions.create(
        model=sparse_server.model_id,
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0.0,
    )
    assert resp.choices[0].text.strip()
    assert resp.usage is not None and 0 < resp.usage.completion_tokens <= 8


def test_per_request_sparsity(sparse_server: Client) -> None:
    client = sparse_server.client()
    achieved = {}
    for level in (0.1, 0.5):
        resp = client.chat.completions.create(
            model=sparse_server.model_id,
            messages=[{"role": "user", "content": "Tell me about the history of printing."}],
            max_tokens=32,
            temperature=0.0,
            extra_body={"sparsity": level},
        )
        assert (resp.choices[0].message.content or "").strip()
        timings = (resp.model_extra or {})["timings"]
        assert timings["sparse_level"] == pytest.approx(level)
        achieved[level] = timings["sparsity"]
        # the table's level is met on this request's tokens, within a margin
        assert abs(achieved[level] - level) < 0.2, timings
    assert achieved[0.5] > achieved[0.1] + 0.15, achieved
    # a request's level is its own: the next request without one is dense again
    resp = client.chat.completions.create(
        model=sparse_server.model_id,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=8,
    )
    assert (resp.model_extra or {})["timings"]["sparsity"] == 0.0


def test_metrics(sparse_server: Client) -> None:
    before = metrics(sparse_server)
    resp = sparse_server.client().completions.create(
        model=sparse_server.model_id,
        prompt="Once upon a time, in a small village by the sea,",
        max_tokens=16,
        temperature=0.0,
        extra_body={"sparsity": 0.5},
    )
    after = metrics(sparse_server)
    assert resp.usage is not None
    # prometheus_client keeps the "llamacpp:" prefix and names counter samples *_total
    assert after["llamacpp:sparse_tokens_total"][0] == "counter"
    assert after["llamacpp:sparse_sparsity"][0] == "gauge"
    counted = after["llamacpp:sparse_tokens_total"][1] - before["llamacpp:sparse_tokens_total"][1]
    assert counted >= resp.usage.completion_tokens
    assert 0.0 < after["llamacpp:sparse_sparsity"][1] < 0.7
    predicted = (
        after["llamacpp:tokens_predicted_total"][1] - before["llamacpp:tokens_predicted_total"][1]
    )
    assert predicted == resp.usage.completion_tokens
    kind, tokens_per_second = after["llamacpp:predicted_tokens_seconds"]  # decode tokens/s
    assert kind == "gauge" and tokens_per_second > 0


# --- bad requests, each followed by a normal one -------------------------------------


def long_prompt() -> str:
    """Over 5000 tokens of real text: more than a slot's 2048."""
    return evaluation_text()[0][:30000]


@pytest.mark.parametrize(
    ("body", "status", "error_type", "says"),
    [
        (chat_body(sparsity=1.5), 400, "invalid_request_error", "1.5"),
        (chat_body(sparsity=-1), 400, "invalid_request_error", "-1"),
        (chat_body(sparsity="abc"), 400, "invalid_request_error", "number"),
        (chat_body(sparsity=0.55), 400, "invalid_request_error", "0.55"),
        (chat_body(model="no-such-model"), 404, "not_found_error", ""),
        (b'{"messages": [{"role": "user", "content": "Hi"}', 400, None, ""),
        ("long", 400, None, "context"),
    ],
    ids=[
        "sparsity-1.5",
        "sparsity-neg",
        "sparsity-str",
        "sparsity-not-a-level",
        "unknown-model",
        "invalid-json",
        "prompt-too-long",
    ],  # fmt: skip
)
def test_bad_request(
    sparse_server: Client,
    body: dict[str, Any] | bytes | str,
    status: int,
    error_type: str | None,
    says: str,
) -> None:
    if body == "long":
        body = {"prompt": long_prompt(), "max_tokens": 8}
        path = "/v1/completions"
    else:
        path = "/v1/chat/completions"
    assert not isinstance(body, str)
    got, answer = sparse_server.request(path, body)
    assert got == status, answer
    assert isinstance(answer, dict), answer
    err = answer["error"]
    assert err["code"] == status and err["message"]
    if error_type is not None:
        assert err["type"] == error_type, err
    if error_type == "invalid_request_error":
        assert "sparsity" in err["message"], err
    assert says in err["message"], err
    assert_serves(sparse_server)


def test_dense_model(dense_server: Client) -> None:
    # its name and its alias are both the served model; sparsity 0 is fine, anything else is not
    for model in (dense_server.model_id, "smollm2-dense"):
        status, body = dense_server.request(
            "/v1/chat/completions", chat_body(model=model, sparsity=0)
        )
        assert status == 200, body
        assert isinstance(body, dict) and body["choices"][0]["message"]["content"].strip()
        assert body["timings"]["sparsity"] == 0.0
    for level in (0.5, 0.1):
        status, body = dense_server.request("/v1/chat/completions", chat_body(sparsity=level))
        assert status == 400, body
        assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
        assert "dense" in body["error"]["message"], body
        assert_serves(dense_server)
    after = metrics(dense_server)
    assert after["llamacpp:sparse_sparsity"][1] == 0.0
    assert after["llamacpp:tokens_predicted_total"][1] > 0
