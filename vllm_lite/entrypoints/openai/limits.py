"""Request limits, answered with OpenAI's error JSON before anything parses the request: headers over
MAX_HEADER_BYTES are a 431; a body larger than --max-request-body-bytes a 413 (at once from its Content-Length; a
chunked body as soon as the bytes received pass the limit); a body that stops arriving a 408."""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import JSONResponse

from vllm_lite import envs
from vllm_lite.entrypoints.args import DEFAULT_MAX_REQUEST_BODY_BYTES  # noqa: F401 - re-exported
from vllm_lite.entrypoints.openai.errors import error_body

# Headers: more than MAX_HEADER_BYTES in all, or more than MAX_HEADER_COUNT of them, is a 431 (vLLM's
# CVE-2025-48956 was memory exhaustion through huge headers); uvicorn's h11 parser buffers at most
# H11_MAX_INCOMPLETE_EVENT_BYTES of a request head and drops the connection beyond it.
MAX_HEADER_BYTES = 64 * 2 ** 10
MAX_HEADER_COUNT = 256
H11_MAX_INCOMPLETE_EVENT_BYTES = 2 ** 20
# A body that stops arriving (shorter than its Content-Length, or a stalled chunked upload) is answered 408 after
# this many seconds without a byte, instead of holding its connection and handler forever.
BODY_READ_TIMEOUT_S = envs.body_read_timeout_s()


class BodyLimitMiddleware:
    """Pure ASGI (streaming and disconnect detection stay intact); also refuses oversized headers (431)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    @staticmethod
    def _headers_too_large(headers: list) -> str | None:
        size = sum(len(k) + len(v) + 4 for k, v in headers)
        if size > MAX_HEADER_BYTES or len(headers) > MAX_HEADER_COUNT:
            return (f"the request headers are too large ({len(headers)} headers, {size} bytes; the limits are "
                    f"{MAX_HEADER_COUNT} headers and {MAX_HEADER_BYTES} bytes)")
        return None

    def _reject(self) -> JSONResponse:
        return JSONResponse(error_body(f"the request body is larger than the server's limit of {self.max_bytes} "
                                       "bytes (--max-request-body-bytes)", 413, "body"), status_code=413,
                            headers={"Connection": "close"})

    def _timeout(self) -> JSONResponse:
        return JSONResponse(error_body(f"the request body stopped arriving: no data for {BODY_READ_TIMEOUT_S:g} s "
                                       "(shorter than its Content-Length?)", 408, "body"), status_code=408,
                            headers={"Connection": "close"})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        why = self._headers_too_large(scope.get("headers", []))
        if why:
            await JSONResponse(error_body(why, 431), status_code=431, headers={"Connection": "close"})(
                scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_large = int(value) > self.max_bytes
                except ValueError:
                    too_large = False  # the HTTP parser refuses a malformed Content-Length itself
                if too_large:
                    await self._reject()(scope, receive, send)
                    return
                break
        received = 0
        exceeded = False
        replaced = False
        body_done = False
        reject = self._reject

        async def counting_receive() -> dict:
            nonlocal received, exceeded, body_done, reject
            if exceeded:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()  # e.g. a handler listening for the client's disconnect: no time limit
            try:
                message = await asyncio.wait_for(receive(), BODY_READ_TIMEOUT_S)
            except asyncio.TimeoutError:
                exceeded = True
                reject = self._timeout
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # end the body here; the app's answer is replaced by the 413
                    exceeded = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def replacing_send(message: dict) -> None:
            nonlocal replaced
            if not exceeded:
                await send(message)
            elif not replaced:
                replaced = True
                await reject()(scope, receive, send)

        await self.app(scope, counting_receive, replacing_send)
        if exceeded and not replaced:  # the app gave up on the body without answering
            await replacing_send({"type": "http.response.start"})
