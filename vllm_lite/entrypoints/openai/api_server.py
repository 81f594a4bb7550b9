"""The OpenAI-compatible HTTP server: FastAPI app factory (`build_app`) and the life cycle (`run_server`).

Life cycle: config -> AsyncEngineClient.start() (a DataParallelClient over M of them with -dp M; the engine core,
usually spawned early by the CLI, spawns the worker, which resolves the model; the tokenizer loads here while the
worker loads the model) -> uvicorn on uvloop.
Ctrl-C / SIGTERM (`_graceful_server`): the listening socket closes, in-flight requests may finish for
`--shutdown-timeout` seconds, the rest end with finish_reason "abort", uvicorn stops, the FastAPI lifespan shuts
the client down (no process left behind) and run_server returns 0. If the
engine dies, in-flight requests fail first, /health turns 503, and a couple of seconds later uvicorn is told to
exit; run_server then returns 1.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import vllm_lite
from vllm_lite import envs
from vllm_lite.entrypoints.args import SERVER_KEEP_ALIVE_S
from vllm_lite.entrypoints.openai.errors import (APIError, api_error_response, error_body, error_response,
                                                 validation_message)
from vllm_lite.entrypoints.openai.limits import (DEFAULT_MAX_REQUEST_BODY_BYTES, H11_MAX_INCOMPLETE_EVENT_BYTES,
                                                 BodyLimitMiddleware)
from vllm_lite.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from vllm_lite.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                   TokenizeRequest)
from vllm_lite.entrypoints.openai.serving_chat import OpenAIServingChat
from vllm_lite.entrypoints.openai.serving_completions import OpenAIServingCompletion
from vllm_lite.inputs import check_token_ids
from vllm_lite.logging_utils import process_start_time

if TYPE_CHECKING:
    from vllm_lite.engine.core_launch import EngineCoreProcess

logger = logging.getLogger("vllm_lite.api_server")

EXIT_DELAY_S = 2.0  # after the engine dies: time for in-flight requests to get their errors and /health its 503
# vLLM leaves these open: load balancers and Prometheus scrapers carry no key
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics"})


class APIKeyMiddleware:
    """Pure ASGI middleware (keeps disconnect detection and streaming intact): `Authorization: Bearer <key>` on
    every route except OPEN_PATHS; the key is compared in constant time."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        auth = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                auth = value
                break
        if hmac.compare_digest(auth, self.expected):
            await self.app(scope, receive, send)
            return
        message = "missing API key" if not auth else "invalid API key"
        response = JSONResponse(error_body(f"Unauthorized: {message} (send 'Authorization: Bearer <key>')", 401),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def build_app(client: Any, served_model_names: list[str] | str | None = None, api_key: str | None = None,
              chat_template: str | None = None, on_shutdown: Any = None, trust_request_chat_template: bool = False,
              max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
              tool_parser: str | None = None) -> FastAPI:
    """The FastAPI app over an engine client (an AsyncEngineClient, or anything with its API, e.g. in tests).

    `api_key` is passed explicitly (cli/args read the environment); `on_shutdown` runs in the lifespan's
    shutdown (run_server passes client.shutdown).
    """
    if served_model_names is None:
        served_model_names = [client.info.model]
    elif isinstance(served_model_names, str):
        served_model_names = [served_model_names]
    model_name = served_model_names[0]
    metrics = ServerMetrics(client, model_name)
    completions = OpenAIServingCompletion(client, served_model_names, metrics)
    chat = OpenAIServingChat(client, served_model_names, metrics, chat_template, trust_request_chat_template,
                             envs.chat_template_timeout_s(), tool_parser=tool_parser)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            if chat.sandbox is not None:
                chat.sandbox.close()
            if on_shutdown is not None:
                logger.info("shutting down the engine")
                on_shutdown()

    app = FastAPI(title="vllm-lite OpenAI-compatible server", version=vllm_lite.__version__, lifespan=lifespan)
    app.state.client = client
    app.state.metrics = metrics
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_body_bytes)  # outermost: before auth and parsing

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return error_response(message, 400, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(str(exc.detail), exc.status_code)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return api_error_response(exc)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(f"internal server error: {exc!r}", 500)

    @app.get("/health")
    async def health() -> Response:
        if client.is_healthy:
            return Response(status_code=200)
        reason = getattr(client, "dead_reason", None) or "engine is not running"
        return error_response(f"unhealthy: {reason}", 503)

    @app.get("/ping")
    async def ping() -> Response:
        return await health()

    @app.get("/version")
    async def version() -> dict:
        return {"version": vllm_lite.__version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card(name: str) -> dict:
        info = client.info
        return {"id": name, "object": "model", "created": created, "owned_by": "vllm-lite",
                "root": getattr(info, "path", name), "parent": None, "max_model_len": int(info.max_model_len),
                "permission": []}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(name) for name in served_model_names]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict:
        completions.check_model(model_id)  # 404 with the error JSON for an unknown id
        return model_card(model_id)

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        return await completions.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await chat.create_chat_completion(request, raw_request)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> Response:
        completions.check_model(request.model)
        tok = client.tokenizer
        if tok is None:
            raise APIError("this server has no tokenizer", 400)
        if request.messages is not None:
            from vllm_lite.entrypoints.openai.protocol import ChatCompletionRequest as _Chat
            chat_req = _Chat(messages=request.messages, add_generation_prompt=request.add_generation_prompt,
                             chat_template=request.chat_template)
            try:
                ids = await chat.render_async(chat_req)
            except ValueError as exc:
                raise APIError(str(exc), 400, "messages") from exc
        elif request.prompt is not None:
            add = True if request.add_special_tokens is None else request.add_special_tokens
            ids = await asyncio.to_thread(lambda: tok(request.prompt, add_special_tokens=add).input_ids)
        else:
            raise APIError("either prompt or messages is required", 400, "prompt")

        def body() -> bytes:  # a long prompt's token strings and JSON take a while: off the loop too
            return json.dumps({"count": len(ids), "max_model_len": completions.max_model_len, "tokens": ids,
                               "token_strs": tok.convert_ids_to_tokens(ids)}, ensure_ascii=False).encode()
        return Response(await asyncio.to_thread(body), media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> Response:
        completions.check_model(request.model)
        if client.tokenizer is None:
            raise APIError("this server has no tokenizer", 400)
        try:
            check_token_ids(request.tokens, completions.vocab_size)
        except ValueError as exc:
            raise APIError(f"tokens is invalid: {exc}", 400, "tokens") from None
        return JSONResponse({"prompt": client.tokenizer.decode(request.tokens)})

    return app


def _log_stage(name: str, start: float) -> float:
    now = time.perf_counter()
    logger.info("%s done in %.2f s", name, now - start)
    return now


def _graceful_server(uconfig: Any, client: Any, shutdown_timeout: float) -> Any:
    """A uvicorn.Server whose first SIGINT/SIGTERM drains: it stops accepting (listening socket and idle keep-alive
    connections closed), waits up to `shutdown_timeout` s for in-flight requests, aborts the rest (finish_reason
    "abort", a clear stop_reason) and then lets uvicorn stop. A second signal aborts at once. The signal is not
    re-raised after serve() (uvicorn's default, which made the process die of SIGTERM, exit status 143)."""
    import uvicorn
    loop = asyncio.get_running_loop()

    class GracefulServer(uvicorn.Server):
        drain: asyncio.Future | None = None
        hurry = asyncio.Event()

        def handle_exit(self, sig: int, frame: Any) -> None:
            loop.call_soon_threadsafe(self.on_signal, signal.Signals(sig).name)

        def on_signal(self, name: str) -> None:
            if self.drain is None:
                self.drain = asyncio.ensure_future(self.drain_then_exit(name))
            else:
                logger.info("%s again: aborting in-flight requests now", name)
                self.hurry.set()

        async def wait_idle(self, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while client.num_in_flight and time.monotonic() < deadline and not self.hurry.is_set():
                await asyncio.sleep(0.05)

        async def drain_then_exit(self, name: str) -> None:
            for server in getattr(self, "servers", ()):
                server.close()
            for connection in list(self.server_state.connections):
                connection.shutdown()  # idle keep-alive ones close; busy ones close after their response
            if client.num_in_flight and shutdown_timeout > 0:
                logger.info("%s: not accepting requests; waiting up to %.1f s (--shutdown-timeout) for %d in-flight "
                            "request(s)", name, shutdown_timeout, client.num_in_flight)
                await self.wait_idle(shutdown_timeout)
            left = client.num_in_flight
            if left:
                logger.warning("%s: aborting %d in-flight request(s)", name, left)
            # also refuses requests still tokenizing (a 503 when they reach the engine)
            await client.abort_all(f"aborted: the server is shutting down ({name}, --shutdown-timeout "
                                   f"{shutdown_timeout:g} s)")
            if left:
                self.hurry.clear()
                await self.wait_idle(5.0)  # their last chunks go out before uvicorn closes the connections
            logger.info("%s: shutting down", name)
            self.should_exit = True

    return GracefulServer(uconfig)


def _load_tokenizer(info: Any) -> Any:
    """Runs in a thread while the engine loads the model (transformers is imported here, not before)."""
    from vllm_lite.tokenizer import load_tokenizer
    start = time.perf_counter()
    tokenizer = load_tokenizer(info)
    logger.info("tokenizer loaded in %.2f s (while the engine loads)", time.perf_counter() - start)
    return tokenizer


async def run_server(engine_kwargs: dict[str, Any], host: str = "127.0.0.1", port: int = 8000,
                     api_key: str | None = None, chat_template: str | None = None, log_level: str = "info",
                     exit_delay_s: float = EXIT_DELAY_S, core: EngineCoreProcess | None = None,
                     shutdown_timeout: float = 0.0, trust_request_chat_template: bool = False,
                     max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
                     tool_parser: str | None = None) -> int:
    """Start the engine and serve until SIGINT/SIGTERM (returns 0) or engine death (returns 1).
    core: an engine core spawned early by the CLI (stopped here on every exit path); shutdown_timeout: how long
    in-flight requests may run on after the signal (`_graceful_server`); tool_parser: the parser of tool_choice
    "auto" (None: "auto" is refused)."""
    import uvicorn

    from vllm_lite.config import EngineConfig
    from vllm_lite.engine.async_client import AsyncEngineClient
    from vllm_lite.engine.dp_client import DataParallelClient

    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    # Until uvicorn installs its own handlers, a signal cancels startup (and the finally below stops the engine).
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main_task.cancel)
    client = None
    shut = False

    def shutdown_client() -> None:
        nonlocal shut
        if client is not None and not shut:
            shut = True
            client.shutdown()

    try:
        t = time.perf_counter()
        config = EngineConfig.from_kwargs(**engine_kwargs)
        t = _log_stage("config", t)
        if not config.model.skip_tokenizer_init:  # import ahead, while waiting for the model description
            from vllm_lite.tokenizer import import_tokenizer_classes
            threading.Thread(target=import_tokenizer_classes, name="tokenizer-import", daemon=True).start()
        # -dp M: M engine-core replicas behind this server; one replica is driven directly (no extra hop)
        client_class = AsyncEngineClient if config.parallel.data_parallel_size == 1 else DataParallelClient
        client = client_class(config, core=core,
                              tokenizer_loader=None if config.model.skip_tokenizer_init else _load_tokenizer)
        await client.start()
        t = _log_stage(f"engine start (resolve, load, profile, {client.num_blocks} KV blocks, warm-up)", t)
        served = config.model.served_model_name or config.model.model
        app = build_app(client, [served], api_key=api_key, chat_template=chat_template, on_shutdown=shutdown_client,
                        trust_request_chat_template=trust_request_chat_template,
                        max_request_body_bytes=max_request_body_bytes, tool_parser=tool_parser)
        uconfig = uvicorn.Config(app, host=host, port=port, log_level=log_level, loop="uvloop", lifespan="on",
                                 timeout_graceful_shutdown=5, timeout_keep_alive=SERVER_KEEP_ALIVE_S, access_log=False,
                                 h11_max_incomplete_event_size=H11_MAX_INCOMPLETE_EVENT_BYTES)
        server = _graceful_server(uconfig, client, shutdown_timeout)

        def on_dead() -> None:
            logger.error("engine died (%s); the server exits in %.1f s", client.dead_reason, exit_delay_s)
            loop.call_later(exit_delay_s, setattr, server, "should_exit", True)
        client.on_dead = on_dead
        if client.dead_reason is not None:
            on_dead()

        async def announce() -> None:
            while not server.started and not server.should_exit:
                await asyncio.sleep(0.05)
            if server.started:
                shown = host if host not in ("0.0.0.0", "::", "") else "localhost"
                print(f"vllm-lite: serving {served} at http://{shown}:{port} "
                      f"(ready {time.time() - process_start_time():.1f} s after launch)", flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        announcer = asyncio.ensure_future(announce())
        await server.serve()
        announcer.cancel()
        return 1 if client.dead_reason is not None else 0
    except asyncio.CancelledError:
        logger.info("interrupted during startup")
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        shutdown_client()
        if client is None and core is not None:
            core.stop()  # failed before the client took it over (a config error, cancelled)
