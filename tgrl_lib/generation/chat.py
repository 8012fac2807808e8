"""The model side of `tgrl serve` (the HTTP side is `generation.serve`): chat-completions request bodies
checked and turned into `HFBackend.generate` calls on one local model, within `ServeLimits`.

Accepted: messages with text and at most one image as a base64 `data:` URL, `n`, `temperature`,
`max_tokens` / `max_completion_tokens`, `seed`. Requests are generated one at a time (the model is
shared); `top_p`/`stop`/streaming are not supported. Bounds, each a `RequestError` (a 4xx with an
OpenAI-style type and code) before anything is generated: numbers finite and in range (a seed in
[0, 2**63 - 1]), JSON nesting depth, images checked from their header (pixels, sides, aspect ratio) before
decoding, message text free of special tokens, and the prompt capped by the model's context (characters
first, so a huge prompt is never tokenized, then tokens with the image expanded, plus `max_tokens`).
The model is reached through a bounded queue: full, 429 with Retry-After; no slot in time, 503.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import math
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tgrl_lib.errors import TgrlError

MAX_IMAGE_PIXELS = 4096 * 4096
MAX_ASPECT_RATIO = 200  # the Qwen2-VL image processor refuses more (smart_resize)
MIN_IMAGE_SIDE = 2
MAX_SEED = 2**63 - 1
CHARS_PER_TOKEN_CAP = 16  # a prompt over context * this many characters is refused before tokenizing
DATA_URL_PREFIX = "data:image/"


class ServeLimits(BaseModel):
    """How much `tgrl serve` takes on at once; over a limit a request is refused, never queued forever."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    backlog: int = Field(256, ge=1, le=65535, description="Listen backlog: connections the kernel holds.")
    max_connections: int = Field(
        128, ge=1, le=4096, description="Connections handled at once; more are answered 503 and closed."
    )
    max_queue: int = Field(
        64, ge=1, le=4096, description="Requests waiting for or holding the model; more are answered 429."
    )
    queue_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Longest wait for the model before a 503."
    )
    socket_timeout_s: float = Field(
        10.0, gt=0, le=600, description="Longest silence on a connection while reading or writing."
    )
    read_deadline_s: float = Field(
        30.0, gt=0, le=3600, description="Longest time to receive one request's headers and body."
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, le=1024**3, description="Largest request body (Content-Length)."
    )
    max_tokens_limit: int = Field(2048, ge=1, description="Largest max_tokens a request may ask for.")
    max_samples: int = Field(32, ge=1, le=1024, description="Largest n (completions per request).")
    max_json_depth: int = Field(32, ge=4, le=512, description="Deepest nesting of the JSON body.")


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and an OpenAI-style error type and code."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str = "invalid_value",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.kind, self.code, self.headers = status, kind, code, headers or {}


def decode_image(url: str) -> Any:
    """A PIL RGB image from a base64 `data:image/...` URL; refuses other URLs, bad data, images over
    `MAX_IMAGE_PIXELS` (read from the header, before decoding) and extreme aspect ratios."""
    from PIL import Image, UnidentifiedImageError

    if not url.startswith(DATA_URL_PREFIX) or ";base64," not in url:
        raise RequestError(400, "image_url must be a base64 data URL (data:image/png;base64,...)")
    try:
        data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "image_url holds invalid base64") from None
    unreadable = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                _check_size(image.width, image.height)
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(400, f"image is over the {MAX_IMAGE_PIXELS} pixel limit") from None
    except unreadable as err:
        raise RequestError(400, f"image_url is not a readable image ({type(err).__name__})") from None


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise RequestError(400, f"image is {width}x{height}, over {MAX_IMAGE_PIXELS} px")
    if min(width, height) < MIN_IMAGE_SIDE or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise RequestError(
            400,
            f"image is {width}x{height}: sides must be >= {MIN_IMAGE_SIDE} px with an aspect ratio up to "
            f"{MAX_ASPECT_RATIO}:1",
        )


def _bounded(body: dict[str, Any], key: str, default: Any, kind: type, low: float, high: float) -> Any:
    value = body.get(key, default)
    if value is None:
        value = default
    if (
        isinstance(value, bool)
        or not isinstance(value, kind | int)
        or (isinstance(value, float) and not math.isfinite(value))
        or not low <= value <= high
    ):
        raise RequestError(400, f"`{key}` must be a number in [{low}, {high}], got {str(value)[:40]}")
    return kind(value)


def _seed(body: dict[str, Any]) -> int | None:
    seed = body.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED
    ):
        raise RequestError(400, f"`seed` must be an integer in [0, 2**63 - 1], got {str(seed)[:40]}")
    return seed


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: a deep value cannot exhaust the stack here)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def context_length(model: Any) -> int:
    """Positions the model can attend to (`max_position_embeddings` of its text config)."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "max_position_embeddings", None) or 2048)


class ModelServer:
    """Turns chat-completions requests into `HFBackend.generate` calls on one local model."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        served_name: str | None = None,
        api_key: str | None = None,
        limits: ServeLimits | None = None,
    ):
        from tgrl_lib.config import BackendConfig
        from tgrl_lib.generation.factory import make_backend

        self.backend = make_backend(BackendConfig(kind="hf"), str(model_dir), batch_size=64)
        self.processor = self.backend.processor
        self.name = served_name or Path(model_dir).resolve().name
        self.api_key = api_key
        self.limits = limits or ServeLimits()
        self.context = context_length(self.backend.model)
        tokenizer = self.backend.tokenizer
        self._special = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()))
        self.created = int(time.time())
        self._admitted = threading.BoundedSemaphore(self.limits.max_queue)  # waiting for or holding the model
        self.model_lock = threading.Lock()  # one generation at a time: the model is shared

    def authorised(self, header: str | None) -> bool:
        if not self.api_key:
            return True
        expected = f"Bearer {self.api_key}".encode()
        return hmac.compare_digest((header or "").encode(), expected)

    def models(self) -> dict[str, Any]:
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "tgrl"}
        return {"object": "list", "data": [card]}

    def chat(self, body: Any) -> dict[str, Any]:
        """The chat-completions answer for one request body (already parsed JSON)."""
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        if json_depth(body) > self.limits.max_json_depth:
            raise RequestError(
                400, f"the JSON body is nested deeper than {self.limits.max_json_depth} levels"
            )
        if body.get("model") != self.name:
            raise RequestError(
                404,
                f"model {str(body.get('model'))[:80]!r} is not served here; use {self.name!r}",
                code="model_not_found",
            )
        if body.get("stream"):
            raise RequestError(400, "streaming is not supported", code="unsupported_value")
        limits = self.limits
        n = _bounded(body, "n", 1, int, 1, limits.max_samples)
        temperature = _bounded(body, "temperature", 1.0, float, 0.0, 2.0)
        max_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = _bounded(body, max_key, 256, int, 1, min(limits.max_tokens_limit, self.context - 1))
        seed = _seed(body)
        prompt, images, prompt_tokens = self._prompt(body.get("messages"), max_tokens)
        completions = self._generate(prompt, images, n, temperature, max_tokens, seed)
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

    def _prompt(self, messages: Any, max_tokens: int) -> tuple[str, list[Any], int]:
        """(templated prompt, images, prompt tokens); a prompt that cannot fit the context with
        `max_tokens` new tokens is refused, by its length in characters before it is tokenized; text
        holding a special token (`<|im_start|>`, `<|image_pad|>`, ...) is refused."""
        from tgrl_lib.models.collate import collate_prompts

        messages, images = self._messages(messages)
        budget = self.context - max_tokens
        texts = _texts(messages)
        chars = sum(map(len, texts))
        if chars > budget * CHARS_PER_TOKEN_CAP:
            raise RequestError(
                400,
                f"the prompt has {chars} characters: it cannot fit the model's context of {self.context} "
                f"tokens with max_tokens {max_tokens}",
                code="context_length_exceeded",
            )
        special = next((t for t in self._special if any(t in text for text in texts)), None)
        if special is not None:
            raise RequestError(400, f"message text must not contain the special token {special!r}")
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        try:  # collated as generation will: the image expanded into its tokens
            encoded = collate_prompts(self.processor, [prompt], images or None)
        except (TgrlError, ValueError, TypeError) as err:
            raise RequestError(400, f"the image or prompt cannot be processed ({str(err)[:200]})") from None
        tokens = int(encoded["input_ids"].shape[1])
        if tokens > budget:
            raise RequestError(
                400,
                f"the prompt is {tokens} tokens; with max_tokens {max_tokens} it exceeds the model's context "
                f"of {self.context} tokens",
                code="context_length_exceeded",
            )
        return prompt, images, tokens

    def _generate(
        self, prompt: str, images: list[Any], n: int, temperature: float, max_tokens: int, seed: Any
    ):
        """Generate under the model lock, admitted through the bounded queue."""
        limits = self.limits
        if not self._admitted.acquire(blocking=False):
            raise RequestError(
                429,
                f"server busy: {limits.max_queue} requests are queued for the model; retry shortly",
                kind="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        try:
            if not self.model_lock.acquire(timeout=limits.queue_timeout_s):
                raise RequestError(
                    503,
                    f"no model slot within {limits.queue_timeout_s:g} s; retry later",
                    kind="server_error",
                    code="overloaded",
                    headers={"Retry-After": "5"},
                )
            try:
                return self.backend.generate(
                    [prompt],
                    images or None,
                    samples=n,
                    temperature=temperature,
                    max_new_tokens=max_tokens,
                    seed=seed,
                )[0]
            finally:
                self.model_lock.release()
        finally:
            self._admitted.release()

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
            if images:  # decode at most one: the second is refused below without decoding it
                images.append(None)
            else:
                images.append(decode_image(url))
            return {"type": "image"}
        raise RequestError(400, "content parts must be {type: text} or {type: image_url}")


def _texts(messages: list[dict[str, Any]]) -> list[str]:
    """Every text of checked messages (string contents and `text` parts)."""
    texts = []
    for message in messages:
        content = message["content"]
        parts = [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]
        texts.extend(parts)
    return texts
