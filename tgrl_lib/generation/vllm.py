"""Rollouts with the offline vLLM engine (GPU only; `pip install 'tgrl[gpu]'`).

One `vllm.LLM` in the trainer's process ("colocate" in TRL's terms): prompts go in as
`{"prompt": text, "multi_modal_data": {"image": PIL image}}`, `SamplingParams(n=samples)` gives the group,
and the completions come back with their token ids, so the trainer scores exactly what was sampled.

Weight sync: after each optimizer step the trainer calls `load_weights(named_tensors)`, which hands the HF
state dict to the model's own `load_weights` (vLLM maps the HF parameter names, e.g. Qwen2.5-VL's
`model.language_model.*`, onto its fused layout). With the V1 engine kept in-process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here before the engine starts, as TRL's colocate mode does) the
model object is reached directly; otherwise the tensors go through `LLM.apply_model`. Tensor parallelism
> 1 is not supported by this direct path (each rank would need its shard).

`vllm` is imported inside the class only, so this module imports on machines without it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from tgrl_lib.errors import TgrlError
from tgrl_lib.generation.base import Completion, non_response_token_ids


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise TgrlError(
            "the vllm rollout backend needs vLLM (GPU only)",
            hint="pip install 'tgrl[gpu]', or set train.backend.kind: hf",
        ) from err
    return vllm


class VLLMBackend:
    """`GenerationBackend` over an offline `vllm.LLM`, with `load_weights` for syncing from the trainer."""

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.4,
        max_model_len: int | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the engine in this process
        vllm = _import_vllm()
        self._sampling_params = vllm.SamplingParams
        self.llm = vllm.LLM(
            model=str(model_path),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            trust_remote_code=trust_remote_code,
            limit_mm_per_prompt={"image": 1},
            enable_prefix_caching=True,
        )
        # image/video special tokens are never sampled (see base.NON_RESPONSE_TOKENS)
        self._suppress = {i: -100.0 for i in non_response_token_ids(self.llm.get_tokenizer())}

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
        if images is not None and len(images) != len(prompts):
            raise TgrlError(f"vllm backend: {len(prompts)} prompts but {len(images)} images")
        params = self._sampling_params(
            n=samples,
            temperature=temperature,
            top_p=1.0,
            top_k=-1 if temperature > 0 else 1,
            max_tokens=max_new_tokens,
            seed=seed,
            skip_special_tokens=True,
            logit_bias=self._suppress or None,
        )
        requests = [
            {"prompt": p} if images is None else {"prompt": p, "multi_modal_data": {"image": images[i]}}
            for i, p in enumerate(prompts)
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [[_completion(o) for o in request.outputs] for request in outputs]

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Copy the trainer's weights (HF names) into the engine; the KV cache is cleared after."""
        weights = list(named_tensors)
        model = self._in_process_model()
        if model is not None:
            model.load_weights(weights)
        else:
            self.llm.apply_model(lambda m: m.load_weights(weights) and None)
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def _in_process_model(self) -> Any | None:
        executor = getattr(self.llm.llm_engine, "model_executor", None)
        worker = getattr(getattr(executor, "driver_worker", None), "worker", None)
        return getattr(getattr(worker, "model_runner", None), "model", None)


def _completion(output: Any) -> Completion:
    finish = "length" if output.finish_reason == "length" else "stop"
    logprobs = None
    if output.logprobs:
        pairs = zip(output.logprobs, output.token_ids, strict=False)  # one {token: Logprob} per step
        logprobs = tuple(step[token].logprob for step, token in pairs)
    return Completion(
        text=output.text, token_ids=tuple(output.token_ids), finish_reason=finish, logprobs=logprobs
    )
