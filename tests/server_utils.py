"""Start a real `vllm-lite serve` subprocess on a free port for tests, wait for /health, and clean up so that no
process of its tree survives (it runs in its own session; cleanup SIGTERMs it, then SIGKILLs the whole group and
any recorded descendant)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for c in children(todo.pop()):
            found.append(c)
            todo.append(c)
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """True for a running process (zombies count as gone: they hold no resources and only await reaping)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if alive(p)]
    return left


# Flags added to every server the tests start with a model (`pytest --server-args "--tensor-parallel-size 2"`,
# conftest.py): the same server tests run against another configuration. Servers of the default model (no model
# argument: test_server_structured's, among others) take DEFAULT_MODEL_EXTRA_ARGS instead (`--default-model-server-args`):
# its 9 attention heads do not split over 2 ranks, but other flags (speculative decoding) apply to it.
EXTRA_ARGS: list[str] = []
DEFAULT_MODEL_EXTRA_ARGS: list[str] = []


class RemoteServer:
    """`with RemoteServer(model, ["--device", "cpu"]) as srv: srv.url_for("v1")`."""

    def __init__(self, model: str | None, args: list[str] | None = None, env: dict[str, str] | None = None,
                 api_key: str | None = None, startup_timeout: float = 180.0) -> None:
        self.model = model
        self.port = free_port()
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile(prefix="vllm-lite-server-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "vllm_lite", "serve", *([model] if model else []), "--host", "127.0.0.1",
               "--port", str(self.port), *(args or []), *(EXTRA_ARGS if model else DEFAULT_MODEL_EXTRA_ARGS)]
        if api_key:
            cmd += ["--api-key", api_key]
        full_env = dict(os.environ)
        full_env.pop("VLLM_LITE_API_KEY", None)
        full_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT,
                                     start_new_session=True)
        self.pgid = self.proc.pid
        self.known_pids: set[int] = set()
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url_for(self, *parts: str) -> str:
        return "/".join([f"http://127.0.0.1:{self.port}", *parts])

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_text(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during startup:\n"
                                   f"{self.log_text()[-4000:]}")
            try:
                if httpx.get(self.url_for("health"), timeout=2).status_code == 200:
                    self.known_pids.update(descendants(self.pid))
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.log_text()[-4000:]}")

    def tree(self) -> list[int]:
        """The server and its live descendants (remembered, so cleanup still finds re-parented ones)."""
        self.known_pids.update(descendants(self.pid))
        return [p for p in [self.pid, *sorted(self.known_pids)] if alive(p)]

    def engine_core_pid(self) -> int:
        """The engine-core process: the server's spawned child that has children of its own (the workers)."""
        spawned = [c for c in children(self.pid) if "resource_tracker" not in cmdline(c)]
        with_kids = [c for c in spawned if children(c)]
        if not (with_kids or spawned):
            raise RuntimeError(f"no engine-core child of {self.pid}")
        return (with_kids or spawned)[0]

    def close(self, timeout: float = 20.0) -> None:
        """SIGTERM, wait; then SIGKILL the process group and every recorded descendant."""
        self.known_pids.update(descendants(self.pid))
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except OSError:
            pass
        for pid in self.known_pids:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()

    def __enter__(self) -> "RemoteServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_tiny_llama(tmp_path_factory, name: str, args: list[str]):
    """For a module-scoped fixture: a tiny random Llama served with `args`; yields (model path, server)."""
    from tiny_models import make_tiny_model
    path = make_tiny_model(tmp_path_factory.mktemp(name), "llama")
    with RemoteServer(path, args) as srv:
        yield path, srv


def kill_midstream(srv: "RemoteServer", pid: int, streams: list, within: float = 10.0) -> httpx.Response:
    """SIGKILL `pid` (an engine core, worker or replica of srv) while `streams` (started openai stream iterators)
    are open: every stream must end with an openai.APIError within `within` seconds. Returns /health's response
    right after (the caller checks its 503)."""
    import openai
    import pytest
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    for it in streams:
        with pytest.raises(openai.APIError):
            for _ in it:
                pass
    elapsed = time.monotonic() - start
    assert elapsed < within, f"requests failed only {elapsed:.1f} s after the kill"
    return httpx.get(srv.url_for("health"), timeout=5)
