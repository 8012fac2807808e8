"""`tgrl serve`: a local model behind an OpenAI-compatible chat-completions route.

The server is `tgrl_lib.generation.serve`.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a local model as an OpenAI-compatible chat-completions endpoint",
        description=(
            "Answer POST /v1/chat/completions and GET /v1/models from a local model directory with the hf "
            "backend (CPU or one GPU), so `tgrl generate --expert openai --base-url http://HOST:PORT/v1` "
            "works without vLLM. Images must be inline base64 data URLs; one request is generated at a time."
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
    parser.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens accepted")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tgrl_lib.generation.serve import serve
    from tgrl_lib.mlops.model_uri import local_model

    model = local_model(args.model, tracking_uri=args.tracking_uri)
    try:
        serve(
            model,
            args.host,
            args.port,
            served_name=args.served_model_name,
            api_key_env=args.api_key_env,
            max_tokens_limit=args.max_tokens_limit,
        )
    except KeyboardInterrupt:
        return 0
    return 0
