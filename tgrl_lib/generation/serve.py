"""`tgrl serve`: a small OpenAI-compatible chat-completions server over a local model (the `hf` backend).

Routes: `POST /v1/chat/completions` (messages with text and at most one image as a base64 `data:` URL,
`n`, `temperature`, `max_tokens` / `max_completion_tokens`, `seed`), `GET /v1/models`, `GET /health`.
It lets a machine without vLLM or a GPU act as the `openai` expert (and the tests run that backend against
a real server). Not a production server: requests are generated one at a time (the model is shared), only
inline images are accepted (no URL fetching), `top_p`/`stop`/streaming are not supported. With
`api_key_env` set, requests must carry `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import sys
import threading
import time
import traceback
import uuid
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tgrl_lib.env import read_env
from tgrl_lib.errors import TgrlError

MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
DATA_URL_PREFIX = "data:image/"


class RequestError(Exception):
    """A request the server refuses, with its HTTP status (OpenAI-style error body)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.kind = kind


def decode_image(url: str) -> Any:
    """A PIL RGB image from a base64 `data:image/...` URL; refuses other URLs, bad data and huge images."""
    from PIL import Image, UnidentifiedImageError

    if not url.startswith(DATA_URL_PREFIX) or ";base64," not in url:
        raise RequestError(400, "image_url must be a base64 data URL (data:image/png;base64,...)")
    try:
        data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "image_url holds invalid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise RequestError(
                        400, f"image is {image.width}x{image.height}, over {MAX_IMAGE_PIXELS} px"
                    )
                return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as err:
        raise RequestError(400, f"image_url is not a readable image ({type(err).__name__})") from None


def _bounded(body: dict[str, Any], key: str, default: Any, kind: type, low: float, high: float) -> Any:
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, kind | int) or not low <= value <= high:
        raise RequestError(400, f"`{key}` must be a number in [{low}, {high}], got {value!r}")
    return kind(value)


class ModelServer:
    """Turns chat-completions requests into `HFBackend.generate` calls on one local model."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        served_name: str | None = None,
        api_key: str | None = None,
        max_tokens_limit: int = 2048,
        max_samples: int = 32,
    ):
        from tgrl_lib.generation.hf import HFBackend

        device = _device()
        self.backend = HFBackend.from_pretrained(str(model_dir), device=device)
        self.processor = self.backend.processor
        self.name = served_name or Path(model_dir).resolve().name
        self.api_key = api_key
        self.max_tokens_limit = max_tokens_limit
        self.max_samples = max_samples
        self.created = int(time.time())
        self._lock = threading.Lock()  # one generation at a time: the model is shared

    def authorised(self, header: str | None) -> bool:
        if not self.api_key:
            return True
        expected = f"Bearer {self.api_key}".encode()
        return hmac.compare_digest((header or "").encode(), expected)

    def models(self) -> dict[str, Any]:
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "tgrl"}
        return {"object": "list", "data": [card]}

    def chat(self, body: Any) -> dict[str, Any]:
        """The chat-completions answer for one request body."""
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        if body.get("model") != self.name:
            raise RequestError(404, f"model {body.get('model')!r} is not served here; use {self.name!r}")
        if body.get("stream"):
            raise RequestError(400, "streaming is not supported")
        messages, images = self._messages(body.get("messages"))
        n = _bounded(body, "n", 1, int, 1, self.max_samples)
        temperature = _bounded(body, "temperature", 1.0, float, 0.0, 2.0)
        max_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = _bounded(body, max_key, 256, int, 1, self.max_tokens_limit)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(400, "`seed` must be an integer")
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        with self._lock:
            completions = self.backend.generate(
                [prompt],
                images or None,
                samples=n,
                temperature=temperature,
                max_new_tokens=max_tokens,
                seed=seed,
            )[0]
        prompt_tokens = len(self.backend.tokenizer(prompt)["input_ids"])
        completion_tokens = sum(c.num_tokens for c in completions)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(completions)
        ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _messages(self, messages: Any) -> tuple[list[dict[str, Any]], list[Any]]:
        """Messages for the chat template (`{"type": "image"}` parts) and the decoded images."""
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "`messages` must be a non-empty list")
        out, images = [], []
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
                raise RequestError(400, "each message needs a role (system, user or assistant) and content")
            content = message.get("content")
            if isinstance(content, list):
                content = [self._part(part, images) for part in content]
            elif not isinstance(content, str):
                raise RequestError(400, "message content must be a string or a list of parts")
            out.append({"role": message["role"], "content": content})
        if len(images) > 1:
            raise RequestError(400, f"at most one image per request, got {len(images)}")
        return out, images

    @staticmethod
    def _part(part: Any, images: list[Any]) -> dict[str, Any]:
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            return {"type": "text", "text": part["text"]}
        if isinstance(part, dict) and part.get("type") == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise RequestError(400, "image_url part without a url")
            images.append(decode_image(url))
            return {"type": "image"}
        raise RequestError(400, "content parts must be {type: text} or {type: image_url}")


def _device() -> str | None:
    import torch

    return "cuda" if torch.cuda.is_available() else None


class _Handler(BaseHTTPRequestHandler):
    server_version = "tgrl-serve/1"
    model_server: ModelServer  # set on the subclass made by `make_server`

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": status}})

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok"})
        elif not self.model_server.authorised(self.headers.get("Authorization")):
            self._error(401, "missing or wrong API key", "authentication_error")
        elif self.path.rstrip("/") == "/v1/models":
            self._send(200, self.model_server.models())
        else:
            self._error(404, f"no route {self.path}", "not_found_error")

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}", "not_found_error")
            return
        if not self.model_server.authorised(self.headers.get("Authorization")):
            self._error(401, "missing or wrong API key", "authentication_error")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY_BYTES:
                raise RequestError(413 if length else 400, f"body must be 1..{MAX_BODY_BYTES} bytes")
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError:
                raise RequestError(400, "the body is not valid JSON") from None
            self._send(200, self.model_server.chat(body))
        except RequestError as err:
            self._error(err.status, str(err), err.kind)
        except Exception:  # a bug or a model failure: answer 500 and keep the traceback in the log
            traceback.print_exc(file=sys.stderr)
            self._error(500, "internal error while generating (see the server log)", "server_error")

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"tgrl serve: {self.address_string()} {format % args}\n")


def make_server(
    model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any
) -> ThreadingHTTPServer:
    """A bound (not yet serving) server; port 0 picks a free port (`server.server_address[1]`)."""
    model_server = ModelServer(model_dir, **kwargs)
    handler = type("Handler", (_Handler,), {"model_server": model_server})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        raise TgrlError(
            f"cannot listen on {host}:{port} ({err.strerror})", hint="pick another --port"
        ) from None
    server.daemon_threads = True
    return server


def serve(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    served_name: str | None = None,
    api_key_env: str | None = None,
    max_tokens_limit: int = 2048,
) -> None:
    """Serve until interrupted; prints the base URL to use as `--base-url`."""
    api_key = read_env(api_key_env) if api_key_env else None
    if api_key_env and not api_key:
        raise TgrlError(f"--api-key-env {api_key_env} is not set in the environment")
    server = make_server(
        model_dir, host, port, served_name=served_name, api_key=api_key, max_tokens_limit=max_tokens_limit
    )
    bound_host, bound_port = server.server_address[:2]
    name = server.RequestHandlerClass.model_server.name  # type: ignore[attr-defined]
    print(f"tgrl serve: model {name!r} at http://{bound_host}:{bound_port}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
