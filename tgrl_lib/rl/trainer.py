"""The training loop: one recipe for `sft`, `grpo` and `tgrl` (DESIGN.md §4), read top to bottom.

Each step: (1) sample problems, (2) roll out G responses each, (3) score them with the verifiable reward,
(4) mix in expert trajectories that pass the in-loop filters (tgrl; sft trains on them alone), (5) drop
zero-variance groups (optional), (6) group-relative advantages over the mixed group, (7) no-grad passes for
old log-probs and token weights, (8) the policy update, (9) sync the generator's weights, (10) metrics,
(11) checkpoint. The pieces live in `rollout`, `mixing`, `update` and `checkpoint`; this module only
orders them and owns the run's state.

The algorithms differ only in data and objective: grpo never injects experts (TGRL with `n_expert=0`),
sft has no rollouts and trains with `losses.sft_loss` on expert trajectories (`mixing.n_expert` per
problem). Devices and mixed precision come from `accelerate`, so `accelerate launch` / `torchrun` runs the
same code on several processes; what each rank draws, how the update stays the global-batch update, and what
is reduced before logging are in `tgrl_lib.rl.distributed` (generation with the hf backend then runs per
rank on its own problems).
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tgrl_lib.config import TrainConfig, flatten
from tgrl_lib.errors import TgrlError
from tgrl_lib.metrics_log import FanoutLogger, JsonlLogger, MetricsLogger
from tgrl_lib.rl import distributed
from tgrl_lib.rl.checkpoint import (
    TrainingState,
    latest_checkpoint,
    load_training_state,
    prune,
    publish_final,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tgrl_lib.rl.mixing import ExpertPool, add_experts, drop_zero_variance, wants_injection
from tgrl_lib.rl.rollout import DataCursor, Group, make_groups, rollout, rollout_stats, score

log = logging.getLogger(__name__)

# config keys that may change between a run and its resumption (everything else must match)
RESUMABLE_KEYS = {"steps", "checkpoint_every", "keep_checkpoints", "resume", "output_dir"}
USES_EXPERTS = ("tgrl", "sft")  # grpo never sees an expert trajectory


def wants_experts(config: TrainConfig, group: Group) -> bool:
    """Whether `group` receives expert trajectories: every group for sft, for tgrl those that
    `mixing.inject_rule` picks (accuracy below `mixing.inject_below`, or all wrong)."""
    m = config.mixing
    return config.algorithm == "sft" or wants_injection(group.accuracy, inject_below=m.inject_below,
                                                        rule=m.inject_rule)  # fmt: skip


@dataclass
class TrainResult:
    """What `train` leaves behind."""

    final_dir: Path  # output_dir/final: the trained model, loadable by models.policy.load_policy
    steps_done: int  # the run's step count on return (== config.steps)
    metrics: dict[str, float]  # the last step's metrics ({} when no step ran in this call)
    resumed_from: int = 0  # step of the checkpoint this call continued from (0 = fresh start)
    message: str = ""  # one line for people, e.g. why nothing was trained


@dataclass
class Run:
    """Everything a step reads or changes."""

    config: TrainConfig
    accelerator: Any
    model: Any  # prepared by accelerate (train mode)
    processor: Any
    optimizer: Any
    scheduler: Any
    dataset: Any  # schema.Dataset of problems
    cursor: DataCursor
    objective: Any
    backend: Any | None = None  # rollout backend (None for sft)
    pool: ExpertPool | None = None  # expert trajectories (None for grpo)
    ref_model: Any | None = None  # frozen reference for the KL (kl_coef > 0)
    step: int = 0
    max_response_tokens: int = 0
    forbidden_ids: frozenset[int] = frozenset()  # ids a response may not contain (image/video slots)

    @property
    def policy(self) -> Any:
        return self.accelerator.unwrap_model(self.model)


# ------------------------------------------------------------------------------------------- entry
def train(
    config: TrainConfig,
    *,
    problems_dir: str | Path,
    experts_dir: str | Path | None = None,
    logger: MetricsLogger | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train `config.model` on the problems (and expert trajectories) into `config.output_dir`.

    Metrics go to `output_dir/metrics.jsonl` and to `logger` if given (the caller closes it);
    `on_step(step, metrics)` is called after every step (progress bars). With `resume: auto` a run
    continues from its newest complete checkpoint; a run that is already complete trains nothing and
    says so in `TrainResult.message`.
    """
    output_dir = Path(config.output_dir)
    resume = resume_state(config, output_dir)
    if resume is not None and resume.step >= config.steps:
        return _already_complete(config, output_dir, resume)
    run = setup(config, problems_dir, experts_dir, resume)
    acc = run.accelerator
    main = acc.is_main_process  # only the main process writes metrics and the final model
    jsonl = JsonlLogger(output_dir / "metrics.jsonl") if main else None
    sink = FanoutLogger(*[x for x in (jsonl, logger) if x is not None and main])
    own = distributed.rank_logger(acc, output_dir)  # several ranks: each one's own unreduced metrics
    metrics: dict[str, float] = {}
    try:
        if run.pool is not None and resume is None:
            sink.log(run.pool.stats(), 0)
        for step in range(run.step + 1, config.steps + 1):
            local = train_step(run, step)
            if own is not None:
                own.log(local, step)
            metrics = distributed.reduce_metrics(acc, local)  # mean over ranks, logged once by the main one
            run.step = step
            sink.log(metrics, step)
            if step % config.checkpoint_every == 0 or step == config.steps:  # 11. checkpoint
                save(run)
            if on_step is not None:
                on_step(step, metrics)
    finally:
        for handle in (jsonl, own):
            if handle is not None:
                handle.close()
    final = output_dir / "final"
    if main:
        publish_final(latest_checkpoint(output_dir), output_dir)
    run.accelerator.wait_for_everyone()
    start = resume.step if resume else 0
    message = f"trained steps {start + 1}-{config.steps}; final model in {final}"
    return TrainResult(final, config.steps, metrics, resumed_from=start, message=message)


# ------------------------------------------------------------------------------------------ resume
def resume_state(config: TrainConfig, output_dir: Path) -> TrainingState | None:
    """The newest complete checkpoint to continue from, or None for a fresh run; refuses to mix runs."""
    latest = latest_checkpoint(output_dir)
    if latest is None:
        return None
    if config.resume == "never":
        raise TgrlError(
            f"output_dir already holds checkpoints (newest {latest.name}) and train.resume is 'never'",
            path=output_dir,
            hint="use a new output_dir, delete the step-* directories, or set train.resume: auto",
        )
    state = load_training_state(latest)
    saved, now = flatten(state.config), flatten(config.model_dump(mode="json"))
    changed = sorted(
        k for k in saved.keys() | now.keys() if k not in RESUMABLE_KEYS and saved.get(k) != now.get(k)
    )
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise TgrlError(
            f"the config differs from the checkpoint's in {len(changed)} key(s) ({diffs})",
            path=latest,
            hint="resume with the same config (only steps/checkpointing may change) or use a new output_dir",
        )
    if state.step > config.steps:
        raise TgrlError(
            f"output_dir holds a checkpoint at step {state.step}, beyond train.steps={config.steps}",
            path=latest,
            hint=f"set train.steps >= {state.step} to continue it, or use a new output_dir",
        )
    return state


def _already_complete(config: TrainConfig, output_dir: Path, state: TrainingState) -> TrainResult:
    final = output_dir / "final"
    if distributed.launched_rank() == 0:  # one writer when launched on several ranks
        if not final.is_dir():  # killed between the last checkpoint and publishing
            final = publish_final(state.path, output_dir)
        prune(output_dir, config.keep_checkpoints)  # killed before the last save pruned the older ones
    message = (
        f"nothing to train: the run in {output_dir} is already complete ({state.step} of {config.steps} "
        f"steps); final model in {final} (raise train.steps to continue, or use a new output_dir)"
    )
    log.warning(message)
    return TrainResult(final, state.step, {}, resumed_from=state.step, message=message)


# ------------------------------------------------------------------------------------------- setup
def setup(
    config: TrainConfig,
    problems_dir: str | Path,
    experts_dir: str | Path | None,
    resume: TrainingState | None,
) -> Run:
    """Load data, policy, optimizer, experts and the rollout backend; restore a checkpoint's state."""
    import torch

    from tgrl_lib.generation.base import non_response_token_ids
    from tgrl_lib.generation.factory import make_backend
    from tgrl_lib.models.policy import Policy, load_policy
    from tgrl_lib.rl.update import OBJECTIVES

    if config.algorithm in USES_EXPERTS and experts_dir is None:
        raise TgrlError(
            f"algorithm {config.algorithm} needs expert trajectories",
            hint="pass --experts DIR (a dataset from tgrl generate / tgrl filter), or use algorithm grpo",
        )
    accelerator = distributed.make_accelerator(config.mixed_precision)
    distributed.check_supported(accelerator, config)
    dataset = _load(problems_dir, "problems")
    start = resume.path if resume is not None else config.model
    trust_remote_code = config.backend.trust_remote_code
    policy = load_policy(start, dtype="float32", trust_remote_code=trust_remote_code)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / warmup) if warmup else 1.0
    )  # linear warm-up over optimizer steps, then constant
    model, optimizer = accelerator.prepare(policy.model.train(), optimizer)
    budget = config.in_loop_filter.max_tokens or config.sampling.max_new_tokens
    run = Run(
        config=config,
        accelerator=accelerator,
        model=model,
        processor=policy.processor,
        optimizer=optimizer,
        scheduler=scheduler,
        dataset=dataset,
        cursor=DataCursor(len(dataset.records), config.seed),
        objective=distributed.GlobalTotals(OBJECTIVES[config.algorithm](config), accelerator),
        max_response_tokens=max(config.sampling.max_new_tokens, budget),
        forbidden_ids=frozenset(non_response_token_ids(policy.tokenizer)),
    )
    if config.algorithm in USES_EXPERTS:
        run.pool = _expert_pool(config, experts_dir, dataset, policy.tokenizer, budget)
    if config.algorithm != "sft":  # hf generates with the policy itself, vllm loads its own copy
        live = Policy(run.policy, policy.processor, policy.path)
        run.backend = make_backend(
            config.backend, live, batch_size=config.sampling.batch_size, seed=config.seed
        )
    if config.loss.kl_coef > 0:
        ref = load_policy(config.model, dtype="float32", trust_remote_code=trust_remote_code)
        run.ref_model = ref.model.to(accelerator.device).eval().requires_grad_(False)
    if resume is not None:
        _restore(run, resume)
    return run


def _load(directory: str | Path, kind: str) -> Any:
    from tgrl_lib.data.schema import load_dataset
    from tgrl_lib.store.artifacts import localize

    dataset = load_dataset(localize(str(directory)), kind)
    if dataset.errors:
        log.warning(
            "%s: skipping %d bad row(s), first: %s", directory, len(dataset.errors), dataset.errors[0]
        )
    if not dataset.records:
        raise TgrlError(f"the {kind} dataset has no usable records", path=directory)
    return dataset


def _expert_pool(
    config: TrainConfig, experts_dir: Any, dataset: Any, tokenizer: Any, budget: int
) -> ExpertPool:
    trajectories = _load(experts_dir, "trajectories").records
    pool = ExpertPool.build(
        trajectories,
        dataset.by_id(),
        tokenizer=tokenizer,
        require_verified=config.in_loop_filter.require_verified,
        max_tokens=budget,
    )
    if pool.size == 0:
        raise TgrlError(
            f"no expert trajectory passed the in-loop filters ({dict(pool.rejected)})",
            path=experts_dir,
            hint="check that the trajectories belong to these problems, or relax train.in_loop_filter",
        )
    return pool


def _restore(run: Run, state: TrainingState) -> None:
    tensors = state.tensors()
    distributed.load_optimizer_state(run.accelerator, run.model, run.optimizer, tensors["optimizer"])
    run.scheduler.load_state_dict(tensors["scheduler"])
    run.cursor.load_state_dict(state.cursor)
    acc = run.accelerator
    own = distributed.rank_rng_state(tensors["rng"], acc.process_index, acc.num_processes)
    if own is not None:
        set_rng_state(own)
    run.step = state.step


def save(run: Run) -> None:
    """Checkpoint the run (main process writes, with every rank's RNG state; every process waits for it)."""
    rng = distributed.gather_rng_states(run.accelerator, rng_state())
    whole = distributed.whole_state(run.accelerator, run.model, run.optimizer)  # FSDP: gathered shards
    if not run.accelerator.is_main_process:
        run.accelerator.wait_for_everyone()
        return
    save_checkpoint(
        Path(run.config.output_dir),
        run.step,
        model=run.policy,
        processor=run.processor,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        cursor=run.cursor.state_dict(),
        config=run.config.model_dump(mode="json"),
        keep=run.config.keep_checkpoints,
        rng=rng,
        whole=whole,
    )
    run.accelerator.wait_for_everyone()


# -------------------------------------------------------------------------------------------- step
def train_step(run: Run, step: int) -> dict[str, float]:
    """One iteration of the algorithm; returns its metrics."""
    import torch

    from tgrl_lib.generation.base import sync_weights
    from tgrl_lib.rl.advantages import group_advantages
    from tgrl_lib.rl.update import build_batch, policy_update, prepare_batch

    cfg, t0 = run.config, time.perf_counter()
    # 1. sample problems (seeded cursor, reshuffled every epoch)
    acc = run.accelerator  # every process draws the same indices and keeps its own share
    rank, world = acc.process_index, acc.num_processes
    drawn = run.cursor.take(cfg.problems_per_step * world)
    problems = [run.dataset.records[i] for i in distributed.shard(drawn, rank, world)]
    groups = make_groups(run.dataset, problems, run.processor)
    # 2. rollout: G responses per problem, sampled with a seed derived from (seed, step, rank)
    generated = 0
    if run.backend is not None:
        generated = rollout(
            run.backend,
            groups,
            samples=cfg.group_size,
            temperature=cfg.sampling.temperature,
            max_new_tokens=cfg.sampling.max_new_tokens,
            seed=distributed.rank_seed(cfg.seed, "rollout", step, rank, world),
            forbidden_ids=run.forbidden_ids,
        )
    t_rollout = time.perf_counter()
    # 3. score with the verifiable reward
    score(groups, cfg.format_reward, cfg.fact_reward)
    metrics = rollout_stats(groups)
    # 4. expert mixing, experts passing the in-loop filters (static ones at pool build, likelihood now)
    if run.pool is not None:
        metrics |= add_experts(
            groups,
            run.pool,
            n_expert=cfg.mixing.n_expert,
            wants=lambda group: wants_experts(cfg, group),
            step=step,
            format_weight=cfg.format_reward,
            likelihood=_likelihood(run),
            min_logprob=cfg.in_loop_filter.min_logprob,
            fact_weight=cfg.fact_reward,
        )
    # 5. optional DAPO filter: groups whose (mixed) rewards are all equal carry no advantage
    if cfg.in_loop_filter.drop_zero_variance and run.backend is not None:
        groups, dropped = drop_zero_variance(groups)
        metrics["groups/dropped_zero_variance"] = float(dropped)
    groups = [g for g in groups if g.samples]  # sft: problems without an eligible expert
    groups, unbalanced, balanced = distributed.balance(acc, groups)  # same rows per rank: DDP passes match
    if world > 1:
        metrics["groups/dropped_rank_balance"] = float(unbalanced)
    if not balanced:
        return metrics | _perf(t0, t_rollout, t_rollout, generated, 0) | {"update/skipped": 1.0}
    # 6. advantages over the mixed group: r - mean(group) [/ std]
    advantages = None
    if run.backend is not None:
        rewards = torch.tensor([[s.reward for s in g.samples] for g in groups])  # [N, G]
        advantages = group_advantages(rewards, scale=cfg.advantage_scale)  # [N, G]
    batch = build_batch(run.processor, groups, advantages, run.max_response_tokens)
    # 7. old log-probs (only when off-policy), token weights, reference log-probs: no grad
    run.model.train()
    metrics |= prepare_batch(batch, run.policy, run.processor, cfg, run.ref_model)
    # 8. update: ppo_epochs x minibatches, gradient accumulation over micro-batches
    metrics |= policy_update(
        run.accelerator, run.model, run.optimizer, run.scheduler, batch, run.objective, cfg, step
    )
    t_update = time.perf_counter()
    # 9. sync the generator's weights (no-op when it shares the model)
    if run.backend is not None:
        sync_weights(run.backend, distributed.whole_tensors(run.accelerator, run.policy))
    # 10. metrics
    if advantages is not None and bool(batch.expert_mask.any()):
        metrics["expert/advantage_mean"] = float(batch.advantages[batch.expert_mask].mean())
    metrics["optim/lr"] = float(run.scheduler.get_last_lr()[0])
    tokens = int(batch.seq.response_mask.sum())
    return metrics | _perf(t0, t_rollout, t_update, generated, tokens)


def _likelihood(run: Run) -> Callable | None:
    """The in-loop policy-likelihood score of expert trajectories, or None when the filter is off."""
    from tgrl_lib.models.logprobs import mean_logprobs

    if run.config.in_loop_filter.min_logprob is None:
        return None

    def score_experts(groups: list[Group], trajectories: list[Any]) -> list[float]:
        means, _ = mean_logprobs(
            run.policy,
            run.processor,
            [g.prompt for g in groups],
            [g.image for g in groups],
            [t.text for t in trajectories],
            batch_size=run.config.micro_batch_size,
            max_response_tokens=run.max_response_tokens,
        )
        return means

    return score_experts


def _perf(t0: float, t_rollout: float, t_update: float, generated: int, tokens: int) -> dict[str, float]:
    now = time.perf_counter()
    return {
        "perf/step_time_s": now - t0,
        "perf/rollout_time_s": t_rollout - t0,
        "perf/update_time_s": t_update - t_rollout,
        "perf/tokens_per_s": tokens / max(now - t0, 1e-9),
        "perf/rollout_tokens_per_s": generated / max(t_rollout - t0, 1e-9),
        "perf/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
