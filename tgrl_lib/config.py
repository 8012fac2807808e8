"""Configuration: one pydantic model per step, YAML recipes, `--set` overrides.

A recipe (`configs/*.yaml`) has one section per step; each section is validated by its model with
`extra="forbid"`, so a misspelt key is an error that names the key. Environment variables and secrets are
`tgrl_lib.env`'s.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tgrl_lib.errors import TgrlError

# scheme://user:password@host: a recipe travels as a pipeline parameter and KFP prints it in step logs.
_URL_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]*:[^/@\s]*@")


class StepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _no_password_in_urls(self) -> StepConfig:
        for name, value in self.__dict__.items():
            if isinstance(value, str) and _URL_PASSWORD.match(value):
                raise ValueError(
                    f"{name} holds a URL with a password; recipes are logged by KFP, so put credentials in "
                    "the environment (MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_*, the api_key_env variable)"
                )
        return self


T = TypeVar("T", bound=StepConfig)


# --------------------------------------------------------------------------------------------- data
class DataConfig(StepConfig):
    n_train: int = Field(512, ge=1, description="Synthetic training problems.")
    n_test: int = Field(128, ge=0, description="Synthetic held-out problems (unseen images).")
    seed: int = Field(0, description="Seed: same seed, byte-identical dataset.")
    image_size: int = Field(56, ge=28, le=1024, description="Square image side in pixels (multiple of 28).")
    families: list[str] | None = Field(None, description="Task families to draw from; None = all.")
    difficulties: list[str] = Field(
        default_factory=lambda: ["easy", "hard"], description="Difficulty levels to draw from."
    )


# ----------------------------------------------------------------------------------------- generate
class GenerateConfig(StepConfig):
    expert: Literal["oracle", "hf", "vllm", "openai"] = Field("oracle", description="Expert backend.")
    model: str | None = Field(None, description="Model path/URI (hf, vllm) or served model name (openai).")
    samples_per_problem: int = Field(1, ge=1, description="K responses per problem.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling.")
    max_new_tokens: int = Field(256, ge=1, description="Response budget in tokens.")
    batch_size: int = Field(16, ge=1, description="Problems per generation batch (hf/vllm).")
    seed: int = Field(0, description="Sampling seed.")
    base_url: str | None = Field(None, description="OpenAI-compatible server root, e.g. http://host:8000/v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Name of the env var holding the API key.")
    concurrency: int = Field(8, ge=1, description="Concurrent requests (openai).")
    max_retries: int = Field(5, ge=0, description="Retries on 429/5xx/timeouts (openai).")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout in seconds (openai).")
    backoff_s: float = Field(
        1.0, ge=0.0, description="First retry waits up to this long (openai; doubles per retry, full jitter)."
    )
    max_backoff_s: float = Field(
        30.0, ge=0.0, description="Longest wait between retries, Retry-After included (openai)."
    )
    throttle_s: float = Field(
        0.0, ge=0.0, description="Sleep after each batch (crash-safety tests, rate limits; normally 0)."
    )
    fault_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="Oracle only: fraction of trajectories with an injected fault."
    )
    fault_kinds: list[str] = Field(
        default_factory=lambda: ["wrong_fact", "wrong_arithmetic", "bad_format", "repetition"],
        description="Oracle only: fault kinds to inject.",
    )
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own code.")


# ------------------------------------------------------------------------------------------- filter
class FilterSpec(StepConfig):
    name: str = Field(description="Filter name (see `tgrl filter --list`).")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the filter.")


class FilterConfig(StepConfig):
    filters: list[FilterSpec] = Field(
        default_factory=lambda: [
            FilterSpec(name=n)
            for n in (
                "parse",
                "verified",
                "format",
                "special_tokens",
                "repetition",
                "length",
                "grounding",
                "duplicates",
                "per_problem_cap",
            )
        ],
        description="Filters applied in order; the first that rejects gives the reason.",
    )
    policy: str | None = Field(None, description="Policy checkpoint for the tokenizer/likelihood filters.")
    batch_size: int = Field(16, ge=1, description="Batch size of the likelihood filter.")


# -------------------------------------------------------------------------------------------- train
class LossConfig(StepConfig):
    aggregation: Literal["token_mean", "seq_mean", "constant"] = Field(
        "token_mean", description="token_mean (DAPO), seq_mean (GRPO) or constant (Dr.GRPO)."
    )
    clip_low: float = Field(0.2, ge=0.0, description="PPO lower clip epsilon for on-policy tokens.")
    clip_high: float = Field(0.28, ge=0.0, description="PPO upper clip epsilon (DAPO clip-higher).")
    clip: bool = Field(True, description="Clip on-policy ratios (LUFFY turns this off).")
    expert_shaping: Literal["shaped", "plain"] = Field(
        "shaped", description="Expert-token ratio: p/(p+gamma) (shaped, LUFFY) or p (plain)."
    )
    shaping_gamma: float = Field(0.1, gt=0.0, description="gamma in p/(p+gamma).")
    kl_coef: float = Field(0.0, ge=0.0, description="k3 KL to the frozen reference; 0 disables it.")
    entropy_coef: float = Field(0.0, ge=0.0, description="Entropy bonus coefficient.")
    constant_length: int | None = Field(None, ge=1, description="Dr.GRPO normaliser; None = max_new_tokens.")


class WeightingConfig(StepConfig):
    kind: Literal["none", "visual_dependency", "entropy"] = Field(
        "visual_dependency", description="Token weights: none, visual dependency (image blanked) or entropy."
    )
    apply_to: Literal["expert", "policy", "both"] = Field(
        "expert",
        description="Which tokens are reweighted. Default expert: weighting the policy's own tokens too "
        "('both') lost the answer format within 20-40 updates on 2 of 2 seeds of the tiny recipe (clamped "
        "scores put ~90% of tokens at w_min); expert-only stayed stable.",
    )
    w_min: float = Field(0.5, ge=0.0, description="Lower clip of the normalised weights.")
    w_max: float = Field(2.0, gt=0.0, description="Upper clip of the normalised weights.")
    alpha: float = Field(1.0, ge=0.0, le=1.0, description="0 = uniform, 1 = full reweighting.")
    normalise: Literal["mean", "rank"] = Field(
        "mean",
        description="How scores become weights: mean (divide by the mean, then clip to [w_min, w_max]) or "
        "rank (by quantile, symmetric around 1, never clipped; robust to heavy-tailed scores, where mean "
        "put ~93% of expert tokens at w_min on the tiny recipe).",
    )

    @model_validator(mode="after")
    def _rank_bounds(self) -> WeightingConfig:
        if self.normalise == "rank" and not self.w_min <= 1.0 <= self.w_max:
            raise ValueError(f"normalise: rank needs w_min <= 1 <= w_max, got {self.w_min}, {self.w_max}")
        return self


class MixingConfig(StepConfig):
    n_expert: int = Field(1, ge=0, description="On-policy slots per group replaced by expert trajectories.")
    inject_below: float = Field(
        1.0, ge=0.0, le=1.0, description="Inject when the group's on-policy accuracy is below this."
    )


class InLoopFilterConfig(StepConfig):
    require_verified: bool = Field(True, description="Only inject experts whose answer verifies.")
    max_tokens: int | None = Field(None, ge=1, description="Expert length budget in policy tokens.")
    min_logprob: float | None = Field(None, description="Mean token log-prob floor under the current policy.")
    drop_zero_variance: bool = Field(False, description="Drop groups whose rewards are all equal (DAPO).")


class TrainConfig(StepConfig):
    algorithm: Literal["sft", "grpo", "tgrl"] = Field("tgrl", description="sft, grpo or tgrl; one loop.")
    model: str = Field("runs/tiny-model", description="Initial policy: path or s3:// URI.")
    output_dir: str = Field("runs/train", description="Checkpoints and metrics go here.")
    seed: int = Field(0, description="Seed for sampling, data order and init.")
    steps: int = Field(40, ge=1, description="Optimizer steps.")
    problems_per_step: int = Field(8, ge=1, description="Problems sampled per step.")
    group_size: int = Field(8, ge=1, description="G: responses per problem.")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each rollout batch.")
    minibatch_size: int = Field(64, ge=1, description="Sequences per optimizer step within an epoch.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per forward pass (grad accumulation).")
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping.")
    temperature: float = Field(
        1.0,
        gt=0.0,
        description="Rollout temperature (pure temperature sampling, no top-k/top-p). The RL loss, old, "
        "reference and visual-dependency log-probs score tokens at the same temperature (logits / T), so "
        "the ratio is taken under the distribution the samples came from; SFT scores at 1.",
    )
    max_new_tokens: int = Field(64, ge=1, description="Rollout budget in tokens.")
    advantage_scale: Literal["none", "group", "batch"] = Field(
        "none", description="Divide advantages by the std of the group/batch, or not (LUFFY)."
    )
    loss: LossConfig = Field(default_factory=LossConfig)

    weighting: WeightingConfig = Field(default_factory=WeightingConfig)
    mixing: MixingConfig = Field(default_factory=MixingConfig)
    in_loop_filter: InLoopFilterConfig = Field(default_factory=InLoopFilterConfig)
    rollout_backend: Literal["hf", "vllm"] = Field("hf", description="Generation backend for rollouts.")
    rollout_batch_size: int = Field(64, ge=1, description="Prompts per generate call (hf backend).")
    vllm_gpu_memory_utilization: float = Field(
        0.4, gt=0.0, le=1.0, description="GPU memory share of the colocated vLLM engine (rollouts)."
    )
    vllm_max_model_len: int | None = Field(
        None, ge=1, description="vLLM context length (prompt + response); None = the model's."
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate mixed precision.")
    checkpoint_every: int = Field(20, ge=1, description="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept.")
    resume: Literal["auto", "never"] = Field("auto", description="auto: continue from the newest checkpoint.")
    format_reward: float = Field(0.1, ge=0.0, description="Reward added for a well-formed response.")
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own code.")


# --------------------------------------------------------------------------------------------- eval
class EvalConfig(StepConfig):
    samples: int = Field(1, ge=1, description="k samples per problem (avg@k, pass@k).")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy.")
    max_new_tokens: int = Field(64, ge=1, description="Response budget in tokens.")
    batch_size: int = Field(32, ge=1, description="Problems per generation batch.")
    backend: Literal["hf", "vllm"] = Field("hf", description="Generation backend.")
    seed: int = Field(0, description="Sampling seed.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N problems per benchmark.")


# ---------------------------------------------------------------------------------------- promotion
class PromoteConfig(StepConfig):
    model_name: str = Field("tgrl-policy", description="Registered model name.")
    primary_metric: str = Field("accuracy", description="Metric the gate compares (mean over benchmarks).")
    margin: float = Field(0.0, ge=0.0, description="Candidate must beat the champion by more than this.")
    max_regression: float = Field(0.05, ge=0.0, description="Largest allowed drop on any benchmark.")


# ----------------------------------------------------------------------------------------- tracking
class TrackingConfig(StepConfig):
    tracking_uri: str | None = Field(
        None, description="MLflow URI; None = $MLFLOW_TRACKING_URI or sqlite:///runs/mlflow.db."
    )
    experiment: str = Field("tgrl", description="MLflow experiment (one per pipeline).")
    artifact_location: str | None = Field(None, description="e.g. s3://bucket/mlflow for new experiments.")
    system_metrics: bool = Field(True, description="Log CPU/GPU/memory as system metrics.")


class PipelineConfig(StepConfig):
    """A whole recipe: every step's section."""

    name: str = Field("tiny-cpu", description="Recipe name.")
    work_dir: str = Field("runs", description="Local working directory for embedded runs.")
    data: DataConfig = Field(default_factory=DataConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if self.train.mixing.n_expert >= self.train.group_size and self.train.algorithm == "tgrl":
            raise ValueError("train.mixing.n_expert must be smaller than train.group_size")
        return self


# ------------------------------------------------------------------------------------ loading, --set
def _format_validation(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {loc}: {first['msg']}{more}"


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`["train.lr=1e-4", "train.loss.clip=false"]` -> nested dict; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise TgrlError(f"--set expects key=value, got {pair!r}")
        value = _parse_scalar(raw)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TgrlError(f"--set {pair!r} conflicts with another --set")
        node[parts[-1]] = value
    return nested


def _parse_scalar(raw: str) -> Any:
    """YAML scalar, except that numbers YAML 1.1 leaves as strings (`3e-4`) become floats."""
    if not raw.strip():
        return ""
    try:
        return float(raw) if "e" in raw.lower() and not raw.strip().isalpha() else yaml.safe_load(raw)
    except (ValueError, yaml.YAMLError):
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping: plain PyYAML keeps the last one silently,
    so a recipe with two `lr:` lines would train with whichever came second."""


def _unique_mapping(loader: _RecipeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may override on purpose
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} given twice (first on line {first[key] + 1}); keep one",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark.line
        except TypeError:  # unhashable key: construct_mapping reports it
            pass
    return loader.construct_mapping(node, deep=True)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _load_recipe(text: str) -> Any:
    loader = _RecipeLoader(text)  # a SafeLoader: no Python object tags
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TgrlError("config file not found", path=path)
    try:
        data = _load_recipe(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(err, "problem", None) or err
        raise TgrlError(f"invalid YAML ({reason})", path=path, line=line) from None
    except UnicodeDecodeError:
        raise TgrlError("config is not UTF-8 text", path=path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TgrlError("config must be a mapping of step sections", path=path)
    return data


def load_config(
    path: Path | str | None,
    model: type[T] = PipelineConfig,
    overrides: list[str] | None = None,
    section: str | None = None,
) -> T:
    """Load a recipe (or one `section` of it) into `model`, applying `--set` overrides on top."""
    data = read_yaml(path) if path is not None else {}
    if section is not None:
        data = _section(data, section, path)
    data = deep_merge(data, parse_overrides(overrides))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise TgrlError(_format_validation(err, str(path or "--set"))) from None


def _section(data: dict[str, Any], section: str, path: Path | str | None) -> dict[str, Any]:
    """`data[section]` of a recipe, refusing unknown sections (a misspelt one would be silently ignored) and
    a section that is not a mapping; `data` itself when it holds no known section (a file of section keys,
    which `model` validates)."""
    sections = set(PipelineConfig.model_fields)
    if section not in data and not set(data) & sections:
        return data
    unknown = sorted(str(key) for key in set(data) - sections)
    if unknown:
        raise TgrlError(
            f"unknown section(s) {', '.join(unknown)}",
            path=path,
            hint=f"sections: {', '.join(sorted(sections))}",
        )
    value = data.get(section)
    if value is not None and not isinstance(value, dict):
        raise TgrlError(
            f"section {section!r} must be a mapping of keys, got {type(value).__name__}", path=path
        )
    return value or {}


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists become their repr."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
