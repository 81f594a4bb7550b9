"""Start a `vllm-lite serve` for an eval run when no --base-url is given, so one command goes from a model name to a
report; the server runs in its own process group and is always stopped (SIGTERM, then SIGKILL) when the eval ends."""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

from vllm_lite.config import DEFAULT_MODEL


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EvalServer:
    """`with EvalServer("smollm2-135m-instruct", "--dtype float32") as srv: srv.base_url` (…/v1)."""

    def __init__(self, model: str, serve_args: str = "", startup_timeout: float = 900.0,
                 log_path: str | None = None) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path or tempfile.NamedTemporaryFile(prefix="vllm-lite-eval-server-", suffix=".log",
                                                                 delete=False).name
        cmd = [sys.executable, "-m", "vllm_lite", "serve", model, "--host", "127.0.0.1", "--port", str(self.port),
               *shlex.split(serve_args)]
        self.command = shlex.join(cmd)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self.close()
            raise

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        health = self.base_url.removesuffix("/v1") + "/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm-lite serve exited with {self.proc.returncode} during start-up "
                                   f"(log {self.log_path}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(health, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vllm-lite serve not healthy after {timeout:.0f} s (log {self.log_path}):\n"
                           f"{self.log_tail()}")

    def close(self, timeout: float = 30.0) -> None:
        """SIGTERM the server, wait, then SIGKILL its whole process group (engine core and workers included)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def __enter__(self) -> "EvalServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_server_args(parser: Any) -> None:
    """The flags every eval shares: where the server is (or which model to serve), concurrency, report folder."""
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", default=None,
                   help="OpenAI API of a running server, e.g. http://127.0.0.1:8000/v1 (default: start "
                        "`vllm-lite serve --model` for this run and stop it afterwards)")
    g.add_argument("--api-key", default=None, help="API key of the running server")
    g.add_argument("--model", default=None,
                   help="model: served by the eval when no --base-url is given (default: smollm2-135m-instruct); "
                        "with --base-url, the name to send (default: the first one the server lists) and the model "
                        "the --reference loads")
    g.add_argument("--serve-args", default="",
                   help="extra flags for the `vllm-lite serve` this eval starts, e.g. '--dtype float32'")
    g.add_argument("--max-concurrency", type=int, default=256, help="most requests in flight at once")
    g.add_argument("--output", default="eval_results", help="report folder (JSON, Markdown, PNG plots)")


@contextlib.contextmanager
def server_for(args: Any) -> Iterator[str]:
    """The base URL to talk to: --base-url as given, or that of a server started for --model for the block."""
    if args.base_url:
        yield args.base_url
        return
    model = args.model or DEFAULT_MODEL
    print(f"starting vllm-lite serve {model} {args.serve_args}".rstrip(), file=sys.stderr, flush=True)
    start = time.perf_counter()
    # A SIGTERM (timeout, kill) unwinds like Ctrl-C, so the server below is stopped instead of left running.
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        with EvalServer(model, args.serve_args) as srv:
            print(f"server ready in {time.perf_counter() - start:.1f} s at {srv.base_url} (log {srv.log_path})",
                  file=sys.stderr, flush=True)
            yield srv.base_url
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)
