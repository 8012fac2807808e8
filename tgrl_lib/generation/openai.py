"""Expert generation from any OpenAI-compatible chat-completions server (`vllm serve`, `tgrl serve`, ...).

The request is the OpenAI chat-completions format: the system prompt of `tgrl_lib.data.prompts` (asking for
`<think>...</think><answer>...</answer>`), then one user turn whose first part is the image as a base64 PNG
data URL (`image_url`) and whose second is the question with its lettered options. `n` samples are asked
for in one request; a server that returns fewer (some ignore `n`) is asked again for the rest.

Transport is the standard library (`urllib`): requests run in a thread pool of `concurrency` workers;
429, 5xx, timeouts and dropped connections are retried `max_retries` times with exponential backoff and full
jitter ("Exponential Backoff And Jitter", AWS Architecture Blog, 2015), and a `Retry-After` header is
honoured when the server sends one. Other 4xx answers are not retried. The API key comes from the env var
named by `api_key_env` (read in `env.read_env`), is sent only as a Bearer header, and is scrubbed from
every error message.
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any

from tgrl_lib.config import OpenAIConfig
from tgrl_lib.env import read_env, scrub
from tgrl_lib.errors import TgrlError
from tgrl_lib.generation.base import Completion

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_ROUNDS_FOR_N = 4  # requests per problem when a server returns fewer than `n` choices


@dataclass
class RequestStats:
    """Counts of what the client did (thread-safe); tests and reports read them."""

    requests: int = 0
    retries: int = 0
    failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


class _Retryable(Exception):
    """A failure worth another attempt; `wait_s` is the server's Retry-After, when it gave one."""

    def __init__(self, message: str, wait_s: float | None = None):
        super().__init__(message)
        self.wait_s = wait_s


def image_data_url(image: Any) -> str:
    """A PNG `data:` URL for a path or a PIL image (what the `image_url` content part carries)."""
    from PIL import Image

    if isinstance(image, str | Path):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None when absent/invalid.

    >>> retry_after_s("3")
    3.0
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ChatClient:
    """POST JSON to `{base_url}/chat/completions` with retries, backoff and a Bearer key."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise TgrlError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stats = RequestStats()
        self._rng = random.Random()  # jitter must differ between clients, so it is not seeded
        self._rng_lock = threading.Lock()

    def _clean(self, text: str) -> str:
        """Error text without the API key (even when its env var name does not look secret)."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return scrub(text)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def get(self, route: str) -> dict[str, Any]:
        """One GET (e.g. `/models`), retried like a POST."""
        return self._with_retries(lambda: self._send(route, None))

    def post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._with_retries(lambda: self._send(route, json.dumps(body).encode("utf-8")))

    def _with_retries(self, send) -> dict[str, Any]:
        for attempt in range(self.max_retries + 1):
            self.stats.add(requests=1)
            try:
                return send()
            except _Retryable as err:
                if attempt == self.max_retries:
                    self.stats.add(failures=1)
                    raise TgrlError(
                        f"{self.base_url}: giving up after {attempt + 1} attempts: {self._clean(str(err))}",
                        hint="check that the server is up and not overloaded, or raise max_retries/timeout_s",
                    ) from None
                self.stats.add(retries=1)
                time.sleep(self._wait_s(attempt, err.wait_s))
        raise AssertionError("unreachable")

    def _wait_s(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2^attempt)]; a Retry-After is a floor (capped)."""
        with self._rng_lock:
            backoff = self._rng.uniform(0.0, min(self.max_backoff_s, self.backoff_s * 2**attempt))
        if retry_after is not None:
            return min(max(retry_after, backoff), max(self.max_backoff_s, self.backoff_s))
        return backoff

    def _send(self, route: str, data: bytes | None) -> dict[str, Any]:
        url = self.base_url + route
        request = urllib.request.Request(
            url, data=data, headers=self._headers(), method="POST" if data else "GET"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as err:
            detail = self._clean(_body_excerpt(err))
            if err.code in RETRY_STATUS or err.code >= 500:
                wait = retry_after_s(err.headers.get("Retry-After"))
                raise _Retryable(f"HTTP {err.code} {detail}", wait) from None
            raise TgrlError(
                f"{url}: HTTP {err.code}: {detail}",
                hint="check base_url, the model name and the API key env var"
                if err.code in (401, 403, 404)
                else "",
            ) from None
        except TimeoutError as err:
            raise _Retryable(f"no answer within {self.timeout_s:g} s ({err})") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError | socket.timeout):
                raise _Retryable(f"no answer within {self.timeout_s:g} s") from None
            raise _Retryable(f"cannot connect ({err.reason})") from None
        except (ConnectionError, HTTPException) as err:
            raise _Retryable(f"connection failed ({type(err).__name__}: {err})") from None
        try:
            return json.loads(payload)
        except ValueError:
            raise _Retryable(
                f"invalid JSON in the answer ({self._clean(payload[:200].decode('utf-8', 'replace'))})"
            ) from None


def _body_excerpt(err: urllib.error.HTTPError) -> str:
    try:
        body = err.read()[:300].decode("utf-8", "replace")
    except (OSError, HTTPException):
        body = ""
    return (err.reason or "") + (f": {body}" if body else "")


class OpenAIBackend:
    """`GenerationBackend` over an OpenAI-compatible server.

    A prompt is the chat message list of `prompts.build_messages` (the server applies its own chat
    template); its `{"type": "image"}` part becomes the image's data URL. A plain string is taken as the
    user's text, after the shared system prompt. Token ids are unknown to a remote client (`token_ids=()`).
    """

    name = "openai"

    def __init__(self, config: OpenAIConfig, model: str):
        if not config.base_url:
            raise TgrlError("the openai expert needs base_url", hint="pass --base-url http://HOST:PORT/v1")
        if not model:
            raise TgrlError("the openai expert needs the served model name", hint="pass --model NAME")
        self.config, self.model = config, model
        self.client = ChatClient(
            config.base_url,
            api_key=read_env(config.api_key_env),
            timeout_s=config.timeout_s,
            max_retries=config.max_retries,
            backoff_s=config.backoff_s,
            max_backoff_s=config.max_backoff_s,
        )

    def generate(
        self,
        prompts: Sequence[Any],
        images: Sequence[Any] | None,
        *,
        samples: int,
        temperature: float,
        max_new_tokens: int,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        """`samples` completions per prompt, `concurrency` requests in flight, in prompt order."""
        if images is not None and len(images) != len(prompts):
            raise TgrlError(f"openai backend: {len(prompts)} prompts but {len(images)} images")
        base = {
            "model": self.model,
            "temperature": temperature,
            "top_p": self.config.top_p,
            "max_tokens": max_new_tokens,
        }
        jobs = []
        for i, prompt in enumerate(prompts):
            image = images[i] if images is not None else None
            messages = to_openai_messages(prompt, image_data_url(image) if image is not None else None)
            jobs.append((base | {"messages": messages}, None if seed is None else seed + i))
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            futures = [pool.submit(self._complete, body, samples, job_seed) for body, job_seed in jobs]
            return [future.result() for future in futures]

    def _complete(self, body: dict[str, Any], samples: int, seed: int | None) -> list[Completion]:
        """`samples` completions of one request, asking again for the rest when a server returns fewer."""
        out: list[Completion] = []
        for round_ in range(MAX_ROUNDS_FOR_N):
            request = body | {"n": samples - len(out)}
            if seed is not None:
                request["seed"] = seed + 7919 * round_
            out += parse_choices(self.client.post("/chat/completions", request), self.client.base_url)
            if len(out) >= samples:
                return out[:samples]
        raise TgrlError(
            f"{self.client.base_url}: asked {MAX_ROUNDS_FOR_N} times for {samples} choices, got {len(out)}",
            hint="the server returns no choices; check its logs",
        )


def to_openai_messages(prompt: Any, image_url: str | None) -> list[dict[str, Any]]:
    """Chat messages with the image as an `image_url` part (see `OpenAIBackend`)."""
    from tgrl_lib.data.prompts import SYSTEM_PROMPT

    if isinstance(prompt, str):
        content: list[dict[str, Any]] = [{"type": "image"}] if image_url else []
        prompt = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [*content, {"type": "text", "text": prompt}]},
        ]
    messages = []
    for message in prompt:
        content = message["content"]
        if isinstance(content, list):
            content = [_part(part, image_url) for part in content]
        messages.append({**message, "content": content})
    return messages


def _part(part: dict[str, Any], image_url: str | None) -> dict[str, Any]:
    if part.get("type") != "image":
        return part
    if image_url is None:
        raise TgrlError("a prompt has an image part but no image was given")
    return {"type": "image_url", "image_url": {"url": image_url}}


def parse_choices(answer: Any, where: str) -> list[Completion]:
    """Completions from a chat-completions answer; a malformed answer is a `TgrlError` naming the server."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list):
        hint = "is this an OpenAI-compatible server?"
        raise TgrlError(f"{where}: the answer has no `choices` list", hint=hint)
    out = []
    for choice in choices:
        message = (choice or {}).get("message") or {}
        content = message.get("content")
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            hint = "is this a chat-completions route?"
            raise TgrlError(f"{where}: a choice has no text content", hint=hint)
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        out.append(Completion(text=content, finish_reason=finish))
    return out
