"""Local generation with transformers `generate`: the rollout backend on CPU and single GPUs.

Prompts are collated LEFT padded (`models.collate.collate_prompts`), `samples` completions per prompt come
from `num_return_sequences` (so a group's samples are contiguous), generation stops at `<|im_end|>` (the
model's `generation_config.eos_token_id` list) or after `max_new_tokens`. Sampling is pure temperature
sampling over the full vocabulary (top-k and top-p off), which is the distribution the RL loss assumes;
`temperature=0` is greedy. Image/video special tokens are suppressed (`base.NON_RESPONSE_TOKENS`): a
sampled `<|image_pad|>` would break the trainer's forward over the response.

Determinism: the draw is seeded with `torch.manual_seed(seed)` inside `torch.random.fork_rng`, so the
same seed and inputs give the same tokens and the caller's RNG stream is left as it was (a resumed run
samples exactly what an uninterrupted one did without checkpointing a sampler state).

Two samplers, one distribution (`sampler`): `decode` (`generation.decode`: each prompt prefilled once and
its cache shared by its G samples, a preallocated cache, a compact loop over the model's own modules;
2.3-2.8x HF `generate`'s tokens/s on the tiny recipe, benchmarks/results/perf.md) and `generate`
(transformers `generate`). `auto`, the default, takes `decode` where `decode.supports(model)` and
`generate` elsewhere. Greedy tokens are identical between the two (tests/generation/test_decode.py);
sampled ones are draws of the same distribution, and `decode` also returns each token's log-prob.

The backend shares the trainer's model object (no copy, nothing to sync); it switches the model to eval
mode for the call and restores the previous mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from tgrl_lib.errors import TgrlError
from tgrl_lib.generation.base import Completion, non_response_token_ids

SAMPLERS = ("auto", "decode", "generate")  # auto: decode where decode.supports(model), else generate
# generation_config settings `generate` applies and `decode` does not: either falls back to `generate`
_GENERATE_ONLY = ("bad_words_ids", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id")


class HFBackend:
    """`GenerationBackend` over a transformers model and its processor (e.g. a `models.policy.Policy`)."""

    name = "hf"

    def __init__(self, model: Any, processor: Any, *, batch_size: int = 64, sampler: str = "auto"):
        if batch_size < 1:
            raise TgrlError(f"hf backend: batch_size must be >= 1, got {batch_size}")
        if sampler not in SAMPLERS:
            raise TgrlError(
                f"hf backend: unknown sampler {sampler!r}", hint=f"use one of {', '.join(SAMPLERS)}"
            )
        self.sampler = sampler
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.stop_ids = self._stop_ids()
        self.suppressed = non_response_token_ids(self.tokenizer)  # never sampled (image/video slots)

    @classmethod
    def from_pretrained(cls, path: str, *, device: Any = None, dtype: Any = None, **kwargs: Any) -> HFBackend:
        from tgrl_lib.models.policy import load_policy

        policy = load_policy(path, device=device, dtype=dtype)
        return cls(policy.model, policy.processor, **kwargs)

    def _stop_ids(self) -> list[int]:
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids = configured if isinstance(configured, list) else [configured]
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        ids = [*ids, im_end if im_end != self.tokenizer.unk_token_id else None, self.tokenizer.eos_token_id]
        stops = list(dict.fromkeys(int(i) for i in ids if i is not None))
        if not stops:
            raise TgrlError("hf backend: the tokenizer has no <|im_end|> or EOS token to stop generation at")
        return stops

    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[Any] | None,
        *,
        samples: int,
        temperature: float,
        max_new_tokens: int,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        """`samples` completions per prompt, grouped by prompt; batches of `batch_size` prompts."""
        if samples < 1 or max_new_tokens < 1 or temperature < 0:
            raise TgrlError(
                f"hf backend: need samples >= 1, max_new_tokens >= 1, temperature >= 0 "
                f"(got {samples}, {max_new_tokens}, {temperature})"
            )
        if images is not None and len(images) != len(prompts):
            raise TgrlError(f"hf backend: {len(prompts)} prompts but {len(images)} images")
        out: list[list[Completion]] = []
        with self._seeded(seed), _eval_mode(self.model):
            for start in range(0, len(prompts), self.batch_size):
                chunk = slice(start, start + self.batch_size)
                part = None if images is None else list(images[chunk])
                out += self._generate_batch(list(prompts[chunk]), part, samples, temperature, max_new_tokens)
        return out

    def uses_decode(self) -> bool:
        """Whether rollouts go through `generation.decode` (else transformers `generate`)."""
        from tgrl_lib.generation import decode

        if self.sampler == "generate":
            return False
        why = None if decode.supports(self.model) else f"a {type(self.model).__name__}"
        unsupported = [k for k in _GENERATE_ONLY if getattr(self._config, k, None)]
        bias = getattr(self._config, "sequence_bias", None) or {}
        if unsupported or any(len(tuple(key)) != 1 for key in bias):
            why = why or f"generation_config {', '.join(unsupported) or 'sequence_bias over several tokens'}"
        if why and self.sampler == "decode":
            raise TgrlError(
                f"hf backend: the decode sampler cannot run {why}", hint="use sampler auto or generate"
            )
        return why is None

    @property
    def _config(self) -> Any:
        return getattr(self.model, "generation_config", None)

    def _generate_batch(
        self, prompts: list[str], images: list[Any] | None, samples: int, temperature: float, max_new: int
    ) -> list[list[Completion]]:
        from tgrl_lib.models.collate import collate_prompts

        device = next(self.model.parameters()).device
        inputs = collate_prompts(self.processor, prompts, images).to(device)
        if self.uses_decode():
            new_tokens, logprobs = self._decode(inputs, samples, temperature, max_new)
        else:
            new_tokens, logprobs = self._hf_generate(inputs, samples, temperature, max_new), None
        completions = [
            self._completion(ids, None if logprobs is None else logprobs[i])
            for i, ids in enumerate(new_tokens)
        ]
        if temperature == 0 and logprobs is None:  # one greedy completion per prompt, repeated
            return [[completion] * samples for completion in completions]
        return [completions[i * samples : (i + 1) * samples] for i in range(len(prompts))]

    def _decode(self, inputs: Any, samples: int, temperature: float, max_new: int) -> tuple[list, list]:
        from tgrl_lib.generation.decode import decode

        config = self._config
        bias = getattr(config, "sequence_bias", None) or {}
        out = decode(
            self.model,
            dict(inputs),
            samples=samples,
            temperature=temperature,
            max_new_tokens=max_new,
            stop_ids=self.stop_ids,
            suppressed=self.suppressed,
            min_new_tokens=int(getattr(config, "min_new_tokens", None) or 0),
            logit_bias={int(next(iter(key))): float(value) for key, value in bias.items()},
        )  # [B*samples, max_new]
        return out.tokens.tolist(), out.logprobs.tolist()

    def _hf_generate(self, inputs: Any, samples: int, temperature: float, max_new: int) -> list[list[int]]:
        import torch

        greedy = temperature == 0  # one greedy completion per prompt
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        # the distribution the loss scores: no penalty a checkpoint's generation_config may carry (the
        # released Qwen2.5-VL ones set repetition_penalty 1.05)
        pure = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
        with torch.no_grad():
            sequences = self.model.generate(
                **inputs,
                **({"do_sample": False} if greedy else sampling),
                **pure,
                num_return_sequences=1 if greedy else samples,
                max_new_tokens=max_new,
                eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                suppress_tokens=self.suppressed or None,
                use_cache=True,
            )  # [B*samples, prompt + new]  (B when greedy)
        return sequences[:, inputs["input_ids"].shape[1] :].tolist()  # [B*samples, <= max_new]

    def _completion(self, ids: list[int], logprobs: list[float] | None = None) -> Completion:
        stop = next((i for i, t in enumerate(ids) if t in self.stop_ids), None)
        kept = ids if stop is None else ids[: stop + 1]  # the closing token is part of the response
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        finish = "length" if stop is None else "stop"
        scored = None if logprobs is None else tuple(logprobs[: len(kept)])
        return Completion(text=text, token_ids=tuple(kept), finish_reason=finish, logprobs=scored)

    def _seeded(self, seed: int | None):
        if seed is None:
            return contextlib.nullcontext()
        return _forked_seed(seed, next(self.model.parameters()).device)


@contextlib.contextmanager
def _forked_seed(seed: int, device: Any):
    import torch

    devices = [device] if getattr(device, "type", "cpu") == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _eval_mode(model: Any):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
