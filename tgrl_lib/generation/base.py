"""The generation interface: one Protocol with one `generate` method, and the `Completion` it returns.

Every backend (`hf` transformers, `vllm` offline engine, `openai` server, the synthetic `oracle`) answers
the same call: rendered prompts (`tgrl_lib.data.prompts.render_prompt`) with one image each, `samples`
completions per prompt, in prompt order. A completion carries its token ids when the backend knows them, so
the trainer scores exactly the tokens that were sampled instead of re-tokenising the text.

Weight sync from the trainer is not part of the Protocol: a backend that holds its own copy of the
weights (vllm) also has `load_weights(named_tensors)`; `sync_weights` calls it when present.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]
# Special tokens a response must never contain: the model reads them as image/video slots, so a sampled one
# breaks the next forward ("image features and image tokens do not match"). Backends suppress them.
NON_RESPONSE_TOKENS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


@dataclass(frozen=True)
class Completion:
    """One sampled response.

    `token_ids` are the response tokens as generated, including the closing end-of-turn token when the
    model emitted one (`finish_reason="stop"`); empty when the backend cannot know them (a remote server).
    `logprobs` are the sampler's per-token log-probs, when the backend reports them.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason = "stop"
    logprobs: tuple[float, ...] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@runtime_checkable
class GenerationBackend(Protocol):
    """Samples `samples` completions for each (prompt, image); returns them grouped by prompt, in order.

    `temperature=0` means greedy (then all samples of a prompt are equal). `seed` makes the draw
    reproducible: the same seed and inputs give the same completions (on the same device and batch).
    """

    name: str

    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[Any] | None,
        *,
        samples: int,
        temperature: float,
        max_new_tokens: int,
        seed: int | None = None,
    ) -> list[list[Completion]]: ...


def non_response_token_ids(tokenizer: Any) -> list[int]:
    """Ids of `NON_RESPONSE_TOKENS` that the tokenizer has (unknown ones are skipped)."""
    ids = []
    for token in NON_RESPONSE_TOKENS:
        i = tokenizer.convert_tokens_to_ids(token)
        if i is not None and i != tokenizer.unk_token_id:
            ids.append(int(i))
    return ids


def sync_weights(backend: GenerationBackend, named_tensors: Iterable[tuple[str, Any]]) -> bool:
    """Push the trainer's weights into a backend that keeps its own copy; False when it shares the
    trainer's model (nothing to do)."""
    load = getattr(backend, "load_weights", None)
    if load is None:
        return False
    load(named_tensors)
    return True
