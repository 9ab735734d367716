"""The bundled llama-server, started from Python: on a free loopback port,
healthy before it is used, stopped afterwards.

    from llama_sparse.server import serve

    with serve("model.sparse.gguf", "--metrics", "-np", "4") as server:
        print(server.url)  # http://127.0.0.1:PORT, the OpenAI API under /v1
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ._paths import tool


class ServerError(RuntimeError):
    """llama-server exited or did not become healthy; the message ends with its log."""


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 3000) -> str:
        """The last n characters of the server's output."""
        return self.log.read_text(errors="replace")[-n:]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 30) -> tuple[int, str]:
    """Status and body of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


@contextlib.contextmanager
def serve(
    model: str | os.PathLike[str],
    *args: str,
    command: Sequence[str] | None = None,
    log: Path | None = None,
    timeout: float = 300.0,
) -> Iterator[Server]:
    """Run llama-server on `model` with `args` on a free loopback port until the
    block ends; yields once GET /health answers 200. `command` replaces the
    bundled binary (e.g. ["llama-sparse", "server"]); `log` keeps its output
    (else a temporary file). Raises ServerError when it exits or is not healthy
    within `timeout` seconds."""
    port = free_port()
    cmd = [*(command or [str(tool("llama-server"))]), "-m", str(model),
           "--host", "127.0.0.1", "--port", str(port), *args]  # fmt: skip
    with contextlib.ExitStack() as stack:
        if log is None:
            log = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "llama-server.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        server = Server(proc, port, log)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise ServerError(
                        f"llama-server exited with {proc.returncode}:\n{server.log_tail()}"
                    )
                with contextlib.suppress(urllib.error.URLError, ConnectionError):
                    if http_get(server.url + "/health")[0] == 200:
                        break
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"llama-server not healthy in {timeout:.0f} s:\n{server.log_tail()}"
                    )
                time.sleep(0.25)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
