"""``refiner serve``: run the HTTP service with uvicorn.

Every option overrides the matching ``REFINER_*`` environment variable; options left out keep the
environment's (or the default) value.
"""

from __future__ import annotations

import argparse
import ctypes.util
import logging
import os
import sys
from collections.abc import Mapping

import uvicorn
from pydantic import ValidationError

from app.settings import Settings

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refiner", description="Refiner: generate, then refine, over HTTP.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument(
        "--model",
        help="embedded:smollm2-135m-instruct (default), embedded:gemma3-270m, a local directory or a hub id",
    )
    serve.add_argument(
        "--reward-model", help="a reward model (sequence classifier, one output) for the `reward` term"
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="default auto")
    serve.add_argument("--api-key", help="require Authorization: Bearer <key> on every route but /health")
    serve.add_argument("--max-batch-size", type=int, help="requests decoded and refined together")
    serve.add_argument("--max-queue", type=int, help="queued requests before answering 429")
    serve.add_argument("--max-input-tokens", type=int)
    serve.add_argument("--max-new-tokens", type=int, help="cap on parameters.max_new_tokens")
    serve.add_argument("--max-total-tokens", type=int)
    serve.add_argument(
        "--generator",
        metavar="SPEC",
        help="let another engine generate the initial outputs: openai:http://host:port/v1 (vLLM, SGLang, "
        "llama.cpp, ...) or tgi:http://host:port; --model is still loaded, to refine them",
    )
    serve.add_argument("--generator-model", help="the `model` name sent to an OpenAI-compatible generator")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with every option given on the command line on top."""
    overrides = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    return Settings(**overrides)


def tcmalloc_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """``environ`` with tcmalloc added to ``LD_PRELOAD``, or None where it is there already or this
    system has no tcmalloc (Debian: libtcmalloc-minimal4; Linux only: ``LD_PRELOAD`` is ld.so's).

    Why: glibc serves large allocations (over its mmap threshold, 32 MB at most: a pass's gathered
    caches, a (rows, 262k) logits block) with fresh pages from the kernel, returns them when freed and
    trims its heap, so each pass page-faults tens of MB again; tcmalloc keeps and reuses them (the
    README, "Speed", measures the difference)."""
    preload = environ.get("LD_PRELOAD", "")
    library = ctypes.util.find_library("tcmalloc_minimal") if sys.platform == "linux" else None
    if "tcmalloc" in preload or library is None:
        return None
    return {**environ, "LD_PRELOAD": " ".join(filter(None, [library, preload]))}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"refiner: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if settings.tcmalloc and (environ := tcmalloc_environment(os.environ)) is not None:
        # A preload takes effect only at a program's start: run this command again (same process id).
        command = [sys.executable, "-m", "app.cli", *(sys.argv[1:] if argv is None else argv)]
        os.execve(sys.executable, command, environ)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log.info("memory allocator: %s", os.environ.get("LD_PRELOAD") or "the C library's")
    # Only local models: never reach a model hub from the server.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from app.main import create_app  # imported late: torch and transformers take a while

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
