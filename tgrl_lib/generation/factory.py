"""Build the configured expert: a generation backend plus the prompt it expects for a problem.

| kind     | backend                  | prompt for a problem                                | images |
|----------|--------------------------|-----------------------------------------------------|--------|
| `oracle` | `oracle.OracleExpert`    | the `Problem` itself (it reads the facts)           | no     |
| `hf`     | `hf.HFBackend`           | `prompts.render_prompt` (the model's chat template) | yes    |
| `vllm`   | `vllm.VLLMBackend` (GPU) | `prompts.render_prompt` (the model's chat template) | yes    |
| `openai` | `openai.OpenAIBackend`   | `prompts.build_messages` (the server's template)    | yes    |

`make_backend(spec, model)` builds every model backend the project uses (expert generation, rollouts,
evaluation, serving, the registry's pyfunc); `make_expert` adds the prompt each expects. Heavy backends
(transformers weights, vLLM) are imported and loaded only when chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tgrl_lib.config import BackendConfig, GenerateConfig
from tgrl_lib.data.schema import Problem
from tgrl_lib.errors import TgrlError

KINDS = ("oracle", "hf", "vllm", "openai")


@dataclass
class Expert:
    """A backend with what `generate_trajectories` needs to call it."""

    backend: Any
    prompt: Callable[[Problem], Any]  # what `backend.generate` takes as one prompt
    needs_images: bool

    @property
    def name(self) -> str:
        return self.backend.name


def _device() -> str | None:
    import torch

    return "cuda" if torch.cuda.is_available() else None


def make_backend(spec: BackendConfig, model: Any, *, batch_size: int = 16, seed: int = 0) -> Any:
    """The one place a generation backend is built, for generate, train, eval and serve.

    `model` is a loaded `models.policy.Policy` (hf: generate with it in place, e.g. the policy being
    trained), a model directory or `s3://` URI (hf, vllm: loaded here), or the served model name (openai).
    The oracle is no model backend: `make_expert` builds it."""
    if spec.kind == "hf":
        from tgrl_lib.generation.hf import HFBackend
        from tgrl_lib.models.policy import Policy, load_policy

        policy = model if isinstance(model, Policy) else None
        if policy is None:
            policy = load_policy(_require(model), device=_device(), trust_remote_code=spec.trust_remote_code)
        return HFBackend(policy.model, policy.processor, batch_size=batch_size)
    if spec.kind == "vllm":
        from tgrl_lib.generation.vllm import VLLMBackend
        from tgrl_lib.models.policy import Policy
        from tgrl_lib.store.artifacts import localize

        path = model.path if isinstance(model, Policy) else localize(_require(model))
        return VLLMBackend(
            str(path),
            gpu_memory_utilization=spec.vllm.gpu_memory_utilization,
            max_model_len=spec.vllm.max_model_len,
            seed=seed,
            trust_remote_code=spec.trust_remote_code,
        )
    if spec.kind == "openai":
        from tgrl_lib.generation.openai import OpenAIBackend

        return OpenAIBackend(spec.openai, model)  # it names what is missing: base_url, then the model
    raise TgrlError(f"backend {spec.kind!r} runs no model", hint=f"choose from {', '.join(KINDS[1:])}")


def _require(model: Any) -> str:
    if not model:
        raise TgrlError("this backend needs a model", hint="pass --model PATH_OR_NAME")
    return str(model)


def _chat_prompt(processor: Any) -> Callable[[Problem], str]:
    from tgrl_lib.data.prompts import render_prompt

    return lambda problem: render_prompt(processor, problem.question, problem.choices)


def prompt_processor(backend: Any, model: Any, trust_remote_code: bool = False) -> Any:
    """The processor whose chat template renders prompts for `backend`: its own (hf), else the model's,
    read without the weights (vllm holds only a tokenizer inside its engine)."""
    processor = getattr(backend, "processor", None)
    if processor is not None:
        return processor
    from tgrl_lib.models.policy import Policy, _load_processor
    from tgrl_lib.store.artifacts import localize

    path = model.path if isinstance(model, Policy) else Path(localize(_require(model)))
    try:
        return _load_processor(Path(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise TgrlError(f"cannot load the processor (chat template) of the model: {err}", path=path) from err


def make_expert(config: GenerateConfig) -> Expert:
    """The configured expert (`config.backend.kind`) ready for `generate_trajectories`."""
    spec = config.backend
    if spec.kind == "oracle":
        from tgrl_lib.generation.oracle import OracleExpert

        return Expert(OracleExpert.from_config(config), prompt=lambda problem: problem, needs_images=False)
    backend = make_backend(spec, config.model, batch_size=config.sampling.batch_size, seed=config.seed)
    if spec.kind in ("hf", "vllm"):
        processor = prompt_processor(backend, config.model, spec.trust_remote_code)
        return Expert(backend, prompt=_chat_prompt(processor), needs_images=True)
    from tgrl_lib.data.prompts import build_messages

    return Expert(backend, prompt=lambda p: build_messages(p.question, p.choices), needs_images=True)


def as_expert(backend: Any) -> Expert:
    """Wrap a backend object given directly (tests, the trainer) the way `make_expert` would."""
    if isinstance(backend, Expert):
        return backend
    if hasattr(backend, "generate_with_meta"):  # the oracle
        return Expert(backend, prompt=lambda problem: problem, needs_images=False)
    if getattr(backend, "name", None) == "openai":
        from tgrl_lib.data.prompts import build_messages

        return Expert(backend, prompt=lambda p: build_messages(p.question, p.choices), needs_images=True)
    processor = getattr(backend, "processor", None)
    if processor is None:
        raise TgrlError(
            f"cannot tell which prompts backend {getattr(backend, 'name', backend)!r} takes",
            hint="pass a tgrl_lib.generation.factory.Expert",
        )
    return Expert(backend, prompt=_chat_prompt(processor), needs_images=True)
