"""The `vllm-lite` console script: `serve` (OpenAI-compatible server), `chat` (interactive terminal chat with a
running server), `complete` (one completion, streamed to stdout), `bench NAME` and `eval NAME` (each a module with
`main(argv)` under vllm_lite.benchmarks / vllm_lite.evals)."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any

from vllm_lite.entrypoints.args import (API_KEY_ENV, DEFAULT_MAX_REQUEST_BODY_BYTES, add_engine_args,
                                        add_shutdown_args, add_tool_args, engine_kwargs_from_args, resolve_api_key,
                                        tool_parser_from_args)

DEFAULT_URL = "http://localhost:8000/v1"


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="start the OpenAI-compatible server",
                       description="Start the OpenAI-compatible HTTP server (FastAPI + uvicorn) with an engine-core "
                                   "process and worker process(es).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=argparse.SUPPRESS, metavar="MODEL",
                   help="model to serve (default: smollm2-135m-instruct, the built-in default model)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (0.0.0.0 for all; use --api-key on a public interface)")
    g.add_argument("--port", type=int, default=8000, help="TCP port")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health and /metrics (env "
                        f"{API_KEY_ENV})")
    g.add_argument("--chat-template", default=None,
                   help="chat template (Jinja text or a path to a file) replacing the tokenizer's")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="allow requests to supply their own chat_template (refused with a 400 by default, as in vLLM)")
    g.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES, metavar="BYTES",
                   help="larger request bodies are refused with a 413 before they are parsed")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn log level")
    add_shutdown_args(g)
    add_tool_args(p.add_argument_group("tool calling"))
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help="base URL of the server's OpenAI API")
    p.add_argument("--api-key", default=None, help=f"API key (env {API_KEY_ENV})")
    p.add_argument("--model", default=None, help="model name (default: the first one the server lists)")
    p.add_argument("--max-tokens", type=int, default=None, help="most tokens to generate per answer")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-lite", description="vllm-lite: a compact LLM inference engine")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{serve,chat,complete,bench,eval,train-draft}")
    _serve_parser(sub)
    p = sub.add_parser("chat", help="interactive chat with a running server",
                       description="Chat with a running vllm-lite (or any OpenAI-compatible) server; tokens stream "
                                   "as they arrive; the conversation is kept; 'quit' or EOF (Ctrl-D) ends.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _client_args(p)
    p.add_argument("--system-prompt", default=None, help="system message that starts the conversation")
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("complete", help="one completion from a running server, streamed to stdout",
                       description="Send PROMPT (or stdin when absent or '-') to /v1/completions and stream the "
                                   "text to stdout.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _client_args(p)
    p.add_argument("prompt", nargs="?", default=None, metavar="PROMPT", help="the prompt (default: read stdin)")
    p.set_defaults(func=cmd_complete)
    p = sub.add_parser("bench", help="run a benchmark (latency, throughput, serve, structured, spec)",
                       description="vllm-lite bench NAME [options]; `--help` after the name lists that "
                                   "benchmark's options.")
    p.add_argument("benchmark", choices=BENCHMARKS)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of that benchmark")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("eval", help="run an accuracy eval (gsm8k, mrcr) against a server",
                       description="vllm-lite eval NAME [options]; `--help` after the name lists that eval's "
                                   "options.")
    p.add_argument("eval_name", choices=EVALS, metavar="{" + ",".join(EVALS) + "}")
    p.add_argument("eval_args", nargs=argparse.REMAINDER, help="options of that eval")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("train-draft", add_help=False,
                       help="train an EAGLE-3 draft head for a model (`vllm-lite train-draft --help`)")
    p.set_defaults(func=lambda args: cmd_train_draft(["--help"]))
    return parser


# Each name is a module with main(argv) under vllm_lite.benchmarks / vllm_lite.evals.
BENCHMARKS = ("latency", "throughput", "serve", "structured", "spec")
EVALS = ("gsm8k", "mrcr")


def cmd_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"vllm_lite.benchmarks.{args.benchmark}")
    status = module.main(args.bench_args)
    return status if isinstance(status, int) else 0  # most return their result dict (used by the tests)


def cmd_eval(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"vllm_lite.evals.{args.eval_name}")
    return int(module.main(args.eval_args) or 0)


def cmd_train_draft(argv: list[str]) -> int:
    """Its options go to its own parser (spec_decode/train/cli.py), so main() hands them over unparsed."""
    from vllm_lite.spec_decode.train.cli import main as train_main
    return train_main(argv)


def _use_bytecode_cache() -> None:
    """Keep compiled bytecode of every imported module under our cache folder (serve's processes inherit it).

    Where site-packages is read-only (container images), Python recompiles each imported source on every start:
    5.5 s of `compile()` per process for torch/transformers on the H100 host. Images often also set
    PYTHONDONTWRITEBYTECODE (to keep .pyc files out of their layers); the cache folder is outside them, so it is
    used anyway. A user's PYTHONPYCACHEPREFIX or VLLM_LITE_BYTECODE_CACHE=0 wins."""
    from vllm_lite import envs
    prefix = envs.bytecode_cache_dir()
    if prefix is None:
        return
    sys.pycache_prefix = prefix
    sys.dont_write_bytecode = False
    os.environ["PYTHONPYCACHEPREFIX"] = prefix  # spawned processes read both at interpreter start
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def cmd_serve(args: argparse.Namespace) -> int:
    from vllm_lite.config import EngineConfig
    try:
        kwargs = engine_kwargs_from_args(args)
        config = EngineConfig.from_kwargs(**kwargs)  # flag errors before anything starts
        tool_parser = tool_parser_from_args(args)
    except ValueError as exc:
        print(f"vllm-lite serve: error: {exc}", file=sys.stderr)
        return 2
    chat_template = args.chat_template
    if chat_template and os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            chat_template = f.read()
    _use_bytecode_cache()
    # The engine core and its worker boot (and resolve the model) while this process imports FastAPI below. From
    # here on every exit path must stop it (run_server does once it runs).
    from vllm_lite.engine.core_launch import spawn_engine_core
    core = spawn_engine_core(config)
    try:
        from vllm_lite.entrypoints.openai.api_server import run_server
    except BaseException:
        core.stop()
        raise
    coro = run_server(kwargs, host=args.host, port=args.port, api_key=resolve_api_key(args.api_key),
                      chat_template=chat_template, log_level=args.uvicorn_log_level, core=core,
                      shutdown_timeout=args.shutdown_timeout,
                      trust_request_chat_template=args.trust_request_chat_template,
                      max_request_body_bytes=args.max_request_body_bytes, tool_parser=tool_parser)
    try:
        try:
            import uvloop
            return uvloop.run(coro)
        except ImportError:
            import asyncio
            return asyncio.run(coro)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - startup failures: one clear line, non-zero exit
        from vllm_lite.engine.async_client import EngineStartupError
        logging.getLogger("vllm_lite").debug("startup failed", exc_info=True)
        what = str(exc) if isinstance(exc, EngineStartupError) else f"{type(exc).__name__}: {exc}"
        print(f"vllm-lite serve: error: {what}", file=sys.stderr)
        return 1


def _openai_client(args: argparse.Namespace) -> Any:
    from openai import OpenAI
    return OpenAI(base_url=args.url, api_key=resolve_api_key(args.api_key) or "EMPTY")


def _model(client: Any, args: argparse.Namespace) -> str:
    return args.model or client.models.list().data[0].id


def _extra(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.max_tokens is not None:
        out["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        out["temperature"] = args.temperature
    return out


def cmd_chat(args: argparse.Namespace) -> int:
    import openai
    client = _openai_client(args)
    try:
        model = _model(client, args)
    except openai.APIError as exc:
        print(f"vllm-lite chat: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    except openai.APIConnectionError as exc:
        print(f"vllm-lite chat: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    messages: list[dict[str, str]] = []
    if args.system_prompt:
        messages.append({"role": "system", "content": args.system_prompt})
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {model} at {args.url} ('quit' or Ctrl-D to end)")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:
            print()
            return 130
        if line.strip() in ("quit", "exit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            stream = client.chat.completions.create(model=model, messages=messages, stream=True, **_extra(args))
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text = chunk.choices[0].delta.content
                    reply.append(text)
                    sys.stdout.write(text)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n[interrupted]")
        except (openai.APIError, openai.APIConnectionError) as exc:
            print(f"\n[error: {exc}]", file=sys.stderr)
            messages.pop()
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_complete(args: argparse.Namespace) -> int:
    import openai
    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    client = _openai_client(args)
    try:
        model = _model(client, args)
        stream = client.completions.create(model=model, prompt=prompt, stream=True, **_extra(args))
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                sys.stdout.write(chunk.choices[0].text)
                sys.stdout.flush()
    except (openai.APIError, openai.APIConnectionError) as exc:
        print(f"vllm-lite complete: error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-draft"]:
        return cmd_train_draft(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.command == "serve" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.version:
        from vllm_lite import __version__
        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
