"""`tgrl serve`: a local model behind an OpenAI-compatible chat-completions route.

The server is `tgrl_lib.generation.serve` (HTTP) over `tgrl_lib.generation.chat` (requests -> the model);
the limit flags fill `ServeLimits`, whose bounds are checked before the model is loaded.
"""

from __future__ import annotations

import argparse

# flag -> ServeLimits field; defaults and bounds live on the model (shown by --help through `_limit_help`)
LIMIT_FLAGS = {
    "--backlog": "backlog",
    "--max-connections": "max_connections",
    "--max-queue": "max_queue",
    "--queue-timeout": "queue_timeout_s",
    "--socket-timeout": "socket_timeout_s",
    "--read-deadline": "read_deadline_s",
    "--max-body-bytes": "max_body_bytes",
    "--max-tokens-limit": "max_tokens_limit",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a local model as an OpenAI-compatible chat-completions endpoint",
        description=(
            "Answer POST /v1/chat/completions and GET /v1/models from a local model directory with the hf "
            "backend (CPU or one GPU), so `tgrl generate --expert openai --base-url http://HOST:PORT/v1` "
            "works without vLLM. Images must be inline base64 data URLs; one request is generated at a time. "
            "Bounded: over --max-connections a connection gets 503, over --max-queue a request gets 429, "
            "a prompt that cannot fit the model's context gets 400."
        ),
    )
    parser.add_argument(
        "--model",
        required=True,
        help="model directory (safetensors), s3:// URI, or models:/NAME/VERSION | models:/NAME@ALIAS",
    )
    parser.add_argument("--tracking-uri", help="MLflow for models:/ URIs (default $MLFLOW_TRACKING_URI)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument(
        "--served-model-name", help="model name clients must send (default: the directory name)"
    )
    parser.add_argument(
        "--api-key-env", help="require `Authorization: Bearer $VAR` with the key read from this env var"
    )
    for flag, field in LIMIT_FLAGS.items():
        parser.add_argument(flag, dest=field, default=None, help=_limit_help(field))
    parser.set_defaults(func=_run)


def _limit_help(field: str) -> str:
    from tgrl_lib.generation.chat import ServeLimits

    info = ServeLimits.model_fields[field]
    return f"{info.description} (default: {info.default})"


def _run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from tgrl_lib.errors import TgrlError
    from tgrl_lib.generation.chat import ServeLimits
    from tgrl_lib.generation.serve import serve
    from tgrl_lib.mlops.model_uri import local_model

    given = {
        field: getattr(args, field) for field in LIMIT_FLAGS.values() if getattr(args, field) is not None
    }
    try:
        limits = ServeLimits(**given)
    except ValidationError as err:
        first = err.errors()[0]
        flag = next(f for f, name in LIMIT_FLAGS.items() if name == first["loc"][0])
        raise TgrlError(f"{flag}: {first['msg']}, got {first['input']!r}") from None
    model = local_model(args.model, tracking_uri=args.tracking_uri)
    try:
        serve(
            model,
            args.host,
            args.port,
            served_name=args.served_model_name,
            api_key_env=args.api_key_env,
            limits=limits,
        )
    except KeyboardInterrupt:
        return 0
    return 0
