"""Build the configured expert: a generation backend plus the prompt it expects for a problem.

| kind     | backend                  | prompt for a problem                                | images |
|----------|--------------------------|-----------------------------------------------------|--------|
| `oracle` | `oracle.OracleExpert`    | the `Problem` itself (it reads the facts)           | no     |
| `hf`     | `hf.HFBackend`           | `prompts.render_prompt` (the model's chat template) | yes    |
| `vllm`   | `vllm.VLLMBackend` (GPU) | `prompts.render_prompt` (the model's chat template) | yes    |
| `openai` | `openai.OpenAIBackend`   | `prompts.build_messages` (the server's template)    | yes    |

Heavy backends (transformers weights, vLLM) are imported and loaded only when chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tgrl_lib.config import GenerateConfig
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


def _require_model(config: GenerateConfig) -> str:
    if not config.model:
        raise TgrlError(f"the {config.expert} expert needs a model", hint="pass --model PATH_OR_NAME")
    return config.model


def make_backend(kind: str, config: GenerateConfig) -> Any:
    """The backend of `kind` configured from `config` (model loaded / client built)."""
    if kind == "oracle":
        from tgrl_lib.generation.oracle import OracleExpert

        return OracleExpert.from_config(config)
    if kind == "hf":
        from tgrl_lib.generation.hf import HFBackend

        return HFBackend.from_pretrained(
            _require_model(config), device=_device(), batch_size=config.batch_size
        )
    if kind == "vllm":
        from tgrl_lib.generation.vllm import VLLMBackend

        return VLLMBackend(
            _require_model(config), seed=config.seed, trust_remote_code=config.trust_remote_code
        )
    if kind == "openai":
        from tgrl_lib.generation.openai import OpenAIBackend

        return OpenAIBackend(config)
    raise TgrlError(f"unknown expert backend {kind!r}", hint=f"choose from {', '.join(KINDS)}")


def _chat_prompt(processor: Any) -> Callable[[Problem], str]:
    from tgrl_lib.data.prompts import render_prompt

    return lambda problem: render_prompt(processor, problem.question, problem.choices)


def _load_processor(config: GenerateConfig) -> Any:
    """The model's processor (for its chat template) without loading the weights."""
    from transformers import AutoProcessor

    import tgrl_lib.models.policy  # noqa: F401  (registers the image+text Qwen-VL processor)

    try:
        return AutoProcessor.from_pretrained(
            _require_model(config), trust_remote_code=config.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise TgrlError(f"cannot load the processor of {config.model}: {err}") from err


def make_expert(config: GenerateConfig) -> Expert:
    """The configured expert (`config.expert`) ready for `generate_trajectories`."""
    backend = make_backend(config.expert, config)
    if config.expert == "oracle":
        return Expert(backend, prompt=lambda problem: problem, needs_images=False)
    if config.expert == "hf":
        return Expert(backend, prompt=_chat_prompt(backend.processor), needs_images=True)
    if config.expert == "vllm":
        return Expert(backend, prompt=_chat_prompt(_load_processor(config)), needs_images=True)
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
