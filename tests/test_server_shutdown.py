"""Clean shutdown of a real `vllm-lite serve` (issue 16): SIGTERM / SIGINT during streams stops accepting new
requests, lets in-flight requests finish for `--shutdown-timeout` seconds (0, the default as in vLLM: none), ends
the rest with finish_reason "abort", exits 0 with no traceback or ERROR line, and leaves no process behind."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from server_utils import RemoteServer, wait_gone
from tiny_models import make_tiny_model

MAX_LEN = 16384  # the long stream cannot finish within the grace period, even on a fast host
SERVER_ARGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", str(MAX_LEN), "--seed", "0"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("shutdown-model"), "llama", max_position_embeddings=MAX_LEN)


class Stream(threading.Thread):
    """A streaming completion read in a thread: its SSE events, the finish reason and how it ended."""

    def __init__(self, srv: RemoteServer, model: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.srv, self.model, self.max_tokens = srv, model, max_tokens
        self.events: list[dict] = []
        self.done_marker = False
        self.error: BaseException | None = None
        self.first = threading.Event()

    def run(self) -> None:
        body = {"model": self.model, "prompt": "Hello world", "max_tokens": self.max_tokens, "stream": True,
                "temperature": 0, "ignore_eos": True}
        try:
            with httpx.Client(timeout=120) as http:
                with http.stream("POST", self.srv.url_for("v1", "completions"), json=body) as resp:
                    assert resp.status_code == 200, resp.read()
                    for line in resp.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            self.done_marker = True
                            continue
                        self.events.append(json.loads(line[6:]))
                        self.first.set()
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            self.error = exc
        finally:
            self.first.set()

    @property
    def finish_reason(self) -> str | None:
        for ev in self.events:
            for choice in ev.get("choices", ()):
                if choice.get("finish_reason"):
                    return choice["finish_reason"]
        return None

    @property
    def text(self) -> str:
        return "".join(c.get("text", "") for ev in self.events for c in ev.get("choices", ()))


def _new_request_refused(srv: RemoteServer, model: str) -> bool:
    try:
        r = httpx.post(srv.url_for("v1", "completions"), json={"model": model, "prompt": "hi", "max_tokens": 2},
                       timeout=10)
    except httpx.TransportError:
        return True  # the listening socket is closed
    return r.status_code == 503


def _assert_clean_exit(srv: RemoteServer, tree: list[int]) -> None:
    code = srv.proc.wait(60)
    log = srv.log_text()
    assert code == 0, f"exit code {code}:\n{log[-4000:]}"
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]
    assert wait_gone(tree, 15) == [], "processes left behind after the shutdown"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_aborts_streams_at_once_by_default(model_dir, sig):
    srv = RemoteServer(model_dir, SERVER_ARGS)
    try:
        tree = srv.tree()
        assert len(tree) >= 3, "expected API server, engine core and a worker"
        stream = Stream(srv, model_dir, MAX_LEN - 16)
        stream.start()
        assert stream.first.wait(60) and stream.error is None, stream.error
        t0 = time.monotonic()
        os.kill(srv.pid, sig)
        stream.join(30)
        assert not stream.is_alive()
        assert time.monotonic() - t0 < 10
        assert stream.error is None, f"the stream broke instead of ending cleanly: {stream.error!r}"
        assert stream.finish_reason == "abort" and stream.done_marker
        _assert_clean_exit(srv, tree)
    finally:
        srv.close()


def test_sigterm_drains_then_aborts_after_shutdown_timeout(model_dir):
    grace = 15.0  # the short stream finishes well within it, even on a loaded host
    srv = RemoteServer(model_dir, SERVER_ARGS + ["--shutdown-timeout", str(grace)])
    try:
        tree = srv.tree()
        short = Stream(srv, model_dir, 64)
        long = Stream(srv, model_dir, MAX_LEN - 16)
        long.start()
        assert long.first.wait(60) and long.error is None, long.error
        short.start()
        assert short.first.wait(60) and short.error is None, short.error
        t0 = time.monotonic()
        os.kill(srv.pid, signal.SIGTERM)
        time.sleep(0.3)
        assert _new_request_refused(srv, model_dir), "a new request was accepted during the shutdown"
        short.join(60)
        assert short.error is None and short.finish_reason == "length" and short.done_marker
        long.join(60)
        waited = time.monotonic() - t0
        assert long.error is None, f"the stream broke instead of ending cleanly: {long.error!r}"
        assert long.finish_reason == "abort" and long.done_marker
        assert grace - 0.5 <= waited < grace + 10, waited
        _assert_clean_exit(srv, tree)
    finally:
        srv.close()


def test_shutdown_timeout_flag_validation():
    from vllm_lite.entrypoints.cli import build_parser
    args = build_parser().parse_args(["serve", "--shutdown-timeout", "2.5"])
    assert args.shutdown_timeout == 2.5
    assert build_parser().parse_args(["serve"]).shutdown_timeout == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--shutdown-timeout", "-1"])
