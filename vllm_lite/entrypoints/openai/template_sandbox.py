"""Request-supplied chat templates (allowed with --trust-request-chat-template) render in child processes that can
be killed: a template is arbitrary Jinja, and a nested loop in one would otherwise hold a server thread (and the
GIL) for hours. A render that takes longer than the time limit (VLLM_LITE_CHAT_TEMPLATE_TIMEOUT_S, default 5 s)
kills its child and is a 400 naming chat_template, as vLLM answers other template errors; a child is also held to
MEMORY_HEADROOM_BYTES of address space and MAX_RENDERED_CHARS of output. The server's own template is trusted
(the operator chose it) and keeps rendering in a thread, without the extra process hop.

The children speak JSON lines over their stdin/stdout (no pickle) and render with transformers'
`render_jinja_template`, the function `tokenizer.apply_chat_template` itself uses, with the tokenizer's special
tokens as template variables; they exit when the server's end of the pipe closes.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from typing import Any

MEMORY_HEADROOM_BYTES = 2 * 2 ** 30  # address space a child may add after start-up (a MemoryError beyond it)
MAX_RENDERED_CHARS = 64 * 2 ** 20
STARTUP_TIMEOUT_S = 60.0  # the child imports transformers' template code once (about a second)
LINE_LIMIT = 2 ** 30  # the longest JSON line read from a child (a rendered prompt)


class TemplateRenderError(ValueError):
    """A request template failed: it timed out, raised, ran out of memory or produced too much text."""


class TemplateSandbox:
    """A small pool of renderer processes, started on first use; `render` is a coroutine (no thread is held while a
    child renders), so heavy templates wait in their children while the event loop and /health go on."""

    def __init__(self, timeout_s: float, max_workers: int = 2) -> None:
        self.timeout_s = timeout_s
        self.max_workers = max_workers
        self._idle: list[asyncio.subprocess.Process] = []
        self._all: set[asyncio.subprocess.Process] = set()
        self._slots: asyncio.Semaphore | None = None

    async def render(self, template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
                     variables: dict[str, Any]) -> str:
        """The rendered prompt text; TemplateRenderError with a message for the client otherwise."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_workers)
        line = json.dumps({"template": template, "messages": messages, "add_generation_prompt": add_generation_prompt,
                           "variables": variables}).encode() + b"\n"
        async with self._slots:
            proc = self._idle.pop() if self._idle else await self._spawn()
            try:
                reply = await asyncio.wait_for(self._ask(proc, line), self.timeout_s)
            except asyncio.TimeoutError:
                self._kill(proc)
                raise TemplateRenderError(f"rendering the chat template took longer than {self.timeout_s:g} s "
                                          "(VLLM_LITE_CHAT_TEMPLATE_TIMEOUT_S); it was stopped") from None
            except BaseException:
                self._kill(proc)  # cancelled (client gone) or a broken pipe: the child's state is unknown
                raise
            if proc.returncode is None:
                self._idle.append(proc)
        if "error" in reply:
            raise TemplateRenderError(f"could not render the conversation: {reply['error']}")
        return reply["text"]

    @staticmethod
    async def _ask(proc: asyncio.subprocess.Process, line: bytes) -> dict[str, Any]:
        proc.stdin.write(line)
        await proc.stdin.drain()
        answer = await proc.stdout.readline()
        if not answer:
            await proc.wait()
            return {"error": f"the renderer exited (status {proc.returncode}; out of memory?)"}
        return json.loads(answer)

    async def _spawn(self) -> asyncio.subprocess.Process:
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vllm_lite.entrypoints.openai.template_sandbox", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env, limit=LINE_LIMIT)
        self._all.add(proc)
        try:
            ready = await asyncio.wait_for(proc.stdout.readline(), STARTUP_TIMEOUT_S)
        except BaseException:
            self._kill(proc)
            raise
        if ready.strip() != b'{"ready": true}':
            self._kill(proc)
            raise TemplateRenderError("the template renderer failed to start")
        return proc

    def _kill(self, proc: asyncio.subprocess.Process) -> None:
        self._all.discard(proc)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    def close(self) -> None:
        """Kill every child (server shutdown); their pipes close with them."""
        for proc in list(self._all):
            self._kill(proc)
        self._idle.clear()


def _child_main() -> None:
    """The renderer child: one JSON request per stdin line, one JSON answer per stdout line."""
    import resource

    from transformers.utils.chat_template_utils import render_jinja_template
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = used + MEMORY_HEADROOM_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            rendered, _ = render_jinja_template(conversations=[req["messages"]], chat_template=req["template"],
                                                add_generation_prompt=req["add_generation_prompt"],
                                                **req["variables"])
            text = rendered[0]
            if len(text) > MAX_RENDERED_CHARS:
                answer = {"error": f"the rendered prompt is longer than {MAX_RENDERED_CHARS} characters"}
            else:
                answer = {"text": text}
        except MemoryError:
            answer = {"error": f"the template needed more than {MEMORY_HEADROOM_BYTES >> 20} MiB of memory"}
        except Exception as exc:  # noqa: BLE001 - Jinja errors of any kind go back to the client
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    _child_main()
