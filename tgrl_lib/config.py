"""Configuration: one pydantic model per step, YAML recipes, `--set` overrides.

A recipe (`configs/*.yaml`) has one section per step; each section is validated by its model with
`extra="forbid"`, so a misspelt key is an error that names the key. Environment variables and secrets are
`tgrl_lib.env`'s.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# scheme://user:password@host: a recipe travels as a pipeline parameter and KFP prints it in step logs.
_URL_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]*:[^/@\s]*@")


class StepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _step_defaults(cls, data: Any) -> Any:
        """A shared sub-model given in part (`sampling: {max_new_tokens: 48}`) keeps this step's defaults
        for the rest (`step_field`), not the sub-model's own."""
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            extra = field.json_schema_extra
            if isinstance(extra, dict) and "step_defaults" in extra and isinstance(data.get(name), dict):
                data = {**data, name: {**extra["step_defaults"], **data[name]}}
        return data

    @model_validator(mode="after")
    def _no_password_in_urls(self) -> StepConfig:
        for name, value in self.__dict__.items():
            if isinstance(value, str) and _URL_PASSWORD.match(value):
                raise ValueError(
                    f"{name} holds a URL with a password; recipes are logged by KFP, so put credentials in "
                    "the environment (MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_*, the api_key_env variable)"
                )
        return self


class DataConfig(StepConfig):
    n_train: int = Field(512, ge=1, description="Synthetic training problems.")
    n_test: int = Field(128, ge=0, description="Synthetic held-out problems (unseen images).")
    seed: int = Field(0, description="Seed: same seed, byte-identical dataset.")
    image_size: int = Field(56, ge=28, le=1024, description="Square image side in pixels (multiple of 28).")
    families: list[str] | None = Field(None, description="Task families to draw from; None = all.")
    difficulties: list[str] = Field(
        default_factory=lambda: ["easy", "hard"], description="Difficulty levels to draw from."
    )


MAX_NEW_TOKENS = 32768  # no response budget above this (a typo like 1e8 would otherwise run on)
MIN_TEMPERATURE = 0.01  # below this logits / T overflows; 0 itself means greedy


class SamplingConfig(StepConfig):
    """How responses are sampled, the same fields for generate, train (rollouts) and eval."""

    temperature: float = Field(
        1.0,
        ge=0.0,
        le=10.0,
        description="0 = greedy, else pure temperature sampling (no top-k/top-p) at this temperature.",
    )
    max_new_tokens: int = Field(
        64, ge=1, le=MAX_NEW_TOKENS, strict=True, description="Response budget in tokens."
    )
    batch_size: int = Field(16, ge=1, le=4096, strict=True, description="Prompts per generate call.")

    @model_validator(mode="after")
    def _temperature_usable(self) -> SamplingConfig:
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {self.temperature}"
            )
        return self


class VllmConfig(StepConfig):
    """vLLM engine settings (GPU only)."""

    gpu_memory_utilization: float = Field(
        0.4, gt=0.0, le=1.0, description="GPU memory share of the vLLM engine (colocated with training)."
    )
    max_model_len: int | None = Field(
        None, ge=1, description="vLLM context length (prompt + response); None = the model's."
    )


class OpenAIConfig(StepConfig):
    """An OpenAI-compatible chat-completions server (vLLM serve, `tgrl serve`, a hosted API)."""

    base_url: str | None = Field(None, description="Server root, e.g. http://host:8000/v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Name of the env var holding the API key.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling, sent with each request.")
    concurrency: int = Field(8, ge=1, le=1024, description="Concurrent requests.")
    max_retries: int = Field(5, ge=0, le=100, description="Retries on 429/5xx/timeouts.")
    timeout_s: float = Field(120.0, gt=0, le=3600, description="Per-request timeout in seconds.")
    backoff_s: float = Field(
        1.0, ge=0.0, le=600, description="First retry waits up to this long (doubles per retry, full jitter)."
    )
    max_backoff_s: float = Field(
        30.0, ge=0.0, le=3600, description="Longest wait between retries, Retry-After included."
    )


class BackendConfig(StepConfig):
    """Which engine generates, and its settings: one spec for generate, train and eval
    (`tgrl_lib.generation.factory.make_backend` builds it)."""

    kind: Literal["oracle", "hf", "vllm", "openai"] = Field(
        "hf", description="oracle (synthetic data only), hf (transformers), vllm (GPU) or openai (a server)."
    )
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own code.")
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="vllm settings.")
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig, description="openai settings.")


def step_field(model: type[StepConfig], description: str, **defaults: Any) -> Any:
    """A sub-model field whose defaults are this step's: used whole when absent, and under the values
    given when given in part."""
    return Field(
        default_factory=lambda: model(**defaults),
        description=description,
        json_schema_extra={"step_defaults": defaults},
    )


def _model_backend(backend: BackendConfig, step: str) -> None:
    """Train and eval score their own model's tokens: only an engine that runs the model will do."""
    if backend.kind not in ("hf", "vllm"):
        raise ValueError(f"{step}.backend.kind must be hf or vllm (it runs the model), got {backend.kind!r}")


class GenerateConfig(StepConfig):
    backend: BackendConfig = step_field(BackendConfig, "The expert's engine.", kind="oracle")
    model: str | None = Field(None, description="Model path/URI (hf, vllm) or served model name (openai).")
    sampling: SamplingConfig = step_field(
        SamplingConfig,
        "Sampling of the expert's responses.",
        temperature=0.7,
        max_new_tokens=256,
        batch_size=16,
    )
    samples_per_problem: int = Field(1, ge=1, le=1024, strict=True, description="K responses per problem.")
    seed: int = Field(0, ge=0, lt=2**63, description="Sampling seed.")
    throttle_s: float = Field(
        0.0,
        ge=0.0,
        le=60.0,
        description="Sleep after each batch (crash-safety tests, rate limits; normally 0).",
    )
    fault_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="Oracle only: fraction of trajectories with an injected fault."
    )
    fault_kinds: list[str] = Field(
        default_factory=lambda: ["wrong_fact", "wrong_arithmetic", "bad_format", "repetition"],
        description="Oracle only: fault kinds to inject.",
    )
    oracle_phrasing: Literal["fixed", "varied"] = Field(
        "fixed",
        description="Oracle only: one fixed phrasing, or wording, fact order and reasoning phrasing drawn "
        "per sample (seeded), so several distinct experts per problem exist.",
    )


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
    expert_sft_coef: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="CHORD mu: loss = (1 - mu) * RL loss + mu * NLL of the injected experts; None = off.",
    )
    expert_sft_coef_end: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="mu at the last step (decayed from expert_sft_coef); None = constant.",
    )
    expert_sft_decay: Literal["linear", "cosine"] = Field(
        "cosine", description="How mu goes from expert_sft_coef to expert_sft_coef_end over train.steps."
    )
    expert_sft_token_weight: Literal["none", "p(1-p)"] = Field(
        "none", description="Per-token weight of the expert NLL: none, or CHORD's sg(p (1 - p))."
    )


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
    normalise: Literal["mean", "rank", "top_k"] = Field(
        "mean",
        description="How scores become weights: mean (divide by the mean, then clip to [w_min, w_max]) or "
        "rank (by quantile, symmetric around 1, never clipped; robust to heavy-tailed scores, where mean "
        "put ~93% of expert tokens at w_min on the tiny recipe), or top_k (VPPO: weight 1 on the top_k share "
        "of tokens by score, 0 on the rest).",
    )

    top_k: float = Field(
        0.2, gt=0.0, le=1.0, description="normalise top_k: share of the selected tokens kept (weight 1)."
    )
    blank_fill: Literal["black", "background"] | tuple[int, int, int] = Field(
        "black",
        description="The visual-dependency counterfactual: black, each image's background (its most common "
        "colour), or an RGB fill.",
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
    inject_rule: Literal["below", "all_wrong"] = Field(
        "below", description="below: accuracy < inject_below; all_wrong: only groups with no correct rollout."
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
    seed: int = Field(0, ge=0, lt=2**63, description="Seed for sampling, data order and init.")
    steps: int = Field(40, ge=1, le=10**7, strict=True, description="Optimizer steps.")
    problems_per_step: int = Field(8, ge=1, le=65536, strict=True, description="Problems sampled per step.")
    group_size: int = Field(8, ge=1, le=1024, strict=True, description="G: responses per problem.")
    ppo_epochs: int = Field(1, ge=1, le=100, strict=True, description="Passes over each rollout batch.")
    minibatch_size: int = Field(
        64, ge=1, strict=True, description="Sequences per optimizer step within an epoch."
    )
    micro_batch_size: int = Field(
        16, ge=1, strict=True, description="Sequences per forward pass (grad accumulation)."
    )
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, strict=True, description="Linear warm-up steps.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping (a huge value: none).")
    sampling: SamplingConfig = step_field(
        SamplingConfig,
        "Rollout sampling. The RL loss, old, reference and visual-dependency log-probs score tokens at the "
        "same temperature (logits / T), so the ratio is taken under the distribution the samples came from; "
        "SFT scores at 1.",
        temperature=1.0,
        max_new_tokens=64,
        batch_size=64,
    )
    advantage_scale: Literal["none", "group", "batch"] = Field(
        "none", description="Divide advantages by the std of the group/batch, or not (LUFFY)."
    )
    loss: LossConfig = Field(default_factory=LossConfig)

    weighting: WeightingConfig = Field(default_factory=WeightingConfig)
    mixing: MixingConfig = Field(default_factory=MixingConfig)
    in_loop_filter: InLoopFilterConfig = Field(default_factory=InLoopFilterConfig)
    backend: BackendConfig = Field(
        default_factory=BackendConfig,
        description="Rollout engine (hf or vllm); its trust_remote_code also governs loading the policy.",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate mixed precision.")
    checkpoint_every: int = Field(
        20, ge=1, strict=True, description="Checkpoint every N steps (and at the end)."
    )
    keep_checkpoints: int = Field(2, ge=1, strict=True, description="Newest checkpoints kept.")
    resume: Literal["auto", "never"] = Field("auto", description="auto: continue from the newest checkpoint.")
    format_reward: float = Field(0.1, ge=0.0, description="Reward added for a well-formed response.")
    fact_reward: float = Field(
        0.0,
        ge=0.0,
        description="Beyond the paper: reward added times the share of true stated facts (needs facts).",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return (
            "no" if value is False else value
        )  # YAML 1.1 reads a bare `no` (`--set mixed_precision=no`) as false

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        _model_backend(self.backend, "train")
        if self.algorithm != "sft" and self.sampling.temperature == 0:
            raise ValueError("train.sampling.temperature must be > 0: RL samples its groups (0 is greedy)")
        if self.algorithm == "tgrl" and self.mixing.n_expert >= self.group_size:
            raise ValueError(
                f"train.mixing.n_expert must be smaller than train.group_size ({self.mixing.n_expert} >= "
                f"{self.group_size}): a group needs on-policy samples"
            )
        return self


class ColdStartConfig(StepConfig):
    """The SFT stage before RL: the policy learns the answer format and to read the image from the
    filtered expert trajectories, so RL starts from a model whose samples earn reward. The rest of the
    loop's settings (batching, checkpointing, seed) are `train`'s."""

    steps: int = Field(
        0, ge=0, le=10**7, strict=True, description="SFT updates before RL; 0 passes the base model through."
    )
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="AdamW learning rate of the SFT updates.")
    problems_per_step: int = Field(
        32, ge=1, le=65536, strict=True, description="Problems per SFT update (their expert trajectories)."
    )
    warmup_steps: int = Field(0, ge=0, strict=True, description="Linear warm-up steps.")
    checkpoint_every: int = Field(100, ge=1, strict=True, description="Checkpoint every N SFT updates.")

    def train_config(self, train: TrainConfig) -> TrainConfig:
        """`train` turned into the SFT run of this stage, without token weights: the base policy's visual
        dependency is noise before it reads the image (the measured warm start, ANCHORS.md, is unweighted)."""
        updates = self.model_dump(exclude={"steps"}) | {"algorithm": "sft", "steps": max(self.steps, 1)}
        updates["weighting"] = {**train.weighting.model_dump(), "kind": "none"}
        return TrainConfig.model_validate({**train.model_dump(), **updates})


class EvalConfig(StepConfig):
    samples: int = Field(1, ge=1, le=1024, strict=True, description="k samples per problem (avg@k, pass@k).")
    sampling: SamplingConfig = step_field(
        SamplingConfig,
        "Sampling of the evaluated model (temperature 0 = greedy).",
        temperature=0.0,
        max_new_tokens=64,
        batch_size=32,
    )
    backend: BackendConfig = Field(default_factory=BackendConfig, description="Engine (hf or vllm).")
    seed: int = Field(0, ge=0, lt=2**63, description="Sampling seed.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N problems per benchmark.")

    @model_validator(mode="after")
    def _consistent(self) -> EvalConfig:
        _model_backend(self.backend, "eval")
        return self


class PromoteConfig(StepConfig):
    model_name: str = Field("tgrl-policy", description="Registered model name.")
    primary_metric: str = Field("accuracy", description="Metric the gate compares (mean over benchmarks).")
    margin: float = Field(
        0.0,
        description="Candidate must beat the champion (with none yet: its start model) by more than this; "
        "negative accepts one up to that much worse.",
    )
    max_regression: float = Field(0.05, ge=0.0, description="Largest allowed drop on any benchmark.")
    floor: float | None = Field(
        None, description="Least mean primary metric a candidate may have to be promoted; None: no floor."
    )


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
    cold_start: ColdStartConfig = Field(default_factory=ColdStartConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


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
