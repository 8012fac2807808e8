"""The policy update: mixed groups -> one padded batch -> no-grad passes -> `ppo_epochs` of optimizer steps.

- `build_batch`: every (group, response) becomes a row of a `models.collate.SequenceBatch`, with its advantage
  and whether it is an expert trajectory.
- `prepare_batch` (no grad, over the whole batch so weights do not depend on the micro-batch split):
  behaviour log-probs `old_logprobs` when the update is off-policy (several epochs or minibatches), the
  with-image and blank-image passes for visual-dependency weights (over the rows the weights apply to
  only: the expert rows by default), the entropy for entropy weights, the frozen reference for the KL.
  With one epoch and one minibatch nothing is off-policy: the old log-probs are the current ones,
  detached (ratio 1, gradient of the plain policy gradient), and that forward is skipped.
- `policy_update`: per epoch a seeded shuffle into minibatches of `minibatch_size`; each minibatch is one
  optimizer step over micro-batches of `micro_batch_size` whose losses sum exactly to the minibatch loss
  (`losses.accumulation_totals`); `accelerate` does backward, mixed precision and gradient clipping.
- The objective is chosen by `algorithm` from `OBJECTIVES` (no if/elif over losses in the loop).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from tgrl_lib.config import TrainConfig
from tgrl_lib.data.images import blank_images
from tgrl_lib.models.collate import SequenceBatch, collate_sequences
from tgrl_lib.models.logprobs import response_logprobs, shared_prefix_logprobs
from tgrl_lib.rl.losses import TGRLLoss, accumulation_totals, chord_coef, sft_loss
from tgrl_lib.rl.rollout import Group, derived_seed
from tgrl_lib.rl.stats import Stat, StatsMeter
from tgrl_lib.rl.weighting import compute_token_weights, selected_tokens, weight_stats


@dataclass
class TrainBatch:
    """Rows of one step's update; per-row tensors share the columns of `seq`."""

    seq: SequenceBatch
    advantages: Tensor  # [B]  0 for SFT
    expert_mask: Tensor  # [B]  bool, True = expert trajectory
    prompts: list[str]
    images: list[Any]
    responses: list[Any]  # token ids (rollouts) or text (experts), as collated
    max_response_tokens: int  # the cap used at collation (a re-collation must use the same)
    old_logprobs: Tensor | None = None  # [B, T]  behaviour policy; None = current, detached
    ref_logprobs: Tensor | None = None  # [B, T]  frozen reference (KL)
    token_weights: Tensor | None = None  # [B, T]  normalised; None = ones

    @property
    def size(self) -> int:
        return int(self.seq.input_ids.shape[0])

    def select(self, rows: Tensor) -> TrainBatch:
        seq = self.seq.select(rows)
        width = seq.input_ids.shape[1]

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rows, :width]

        return replace(
            self,
            seq=seq,
            advantages=self.advantages[rows],
            expert_mask=self.expert_mask[rows],
            old_logprobs=cut(self.old_logprobs),
            ref_logprobs=cut(self.ref_logprobs),
            token_weights=cut(self.token_weights),
        )


def build_batch(
    processor: Any, groups: Sequence[Group], advantages: Tensor | None, max_response_tokens: int
) -> TrainBatch:
    """One row per response of every group, groups in order; `advantages` is [N, G] (None for SFT)."""
    rows = [(g, s) for g in groups for s in g.samples]
    prompts, images = [g.prompt for g, _ in rows], [g.image for g, _ in rows]
    responses = [s.response for _, s in rows]
    seq = collate_sequences(processor, prompts, images, responses, max_response_tokens)
    adv = torch.zeros(len(rows)) if advantages is None else advantages.reshape(-1).float()  # [B]
    expert = torch.tensor([s.is_expert for _, s in rows], dtype=torch.bool)  # [B]
    return TrainBatch(seq, adv, expert, prompts, images, responses, max_response_tokens)


# ------------------------------------------------------------------------------------ no-grad passes
@torch.no_grad()
def batched_logprobs(
    model: Any,
    seq: SequenceBatch,
    micro_batch_size: int,
    *,
    with_entropy: bool = False,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """`response_logprobs` of the whole batch in micro-batches, no grad: ([B, T], [B, T] | None).
    Rows sharing a prompt (a group's G samples) encode it once (`shared_prefix_logprobs`)."""
    score = {"with_entropy": with_entropy, "temperature": temperature}
    B, T = seq.input_ids.shape
    logprobs = torch.zeros((B, T), dtype=torch.float32)
    entropy = torch.zeros((B, T), dtype=torch.float32) if with_entropy else None
    device = next(model.parameters()).device
    for start in range(0, B, micro_batch_size):
        rows = torch.arange(start, min(start + micro_batch_size, B))
        part = seq.select(rows).to(device)
        shared = shared_prefix_logprobs(model, part, **score)
        lp, ent = shared if shared is not None else response_logprobs(model, part, **score)
        logprobs[rows, : lp.shape[1]] = lp.float().cpu()
        if entropy is not None and ent is not None:
            entropy[rows, : ent.shape[1]] = ent.float().cpu()
    return logprobs, entropy


def is_off_policy(config: TrainConfig, batch_size: int) -> bool:
    """Whether any optimizer step sees weights that differ from the ones that sampled its rows."""
    return config.ppo_epochs > 1 or batch_size > config.minibatch_size


def prepare_batch(
    batch: TrainBatch, model: Any, processor: Any, config: TrainConfig, ref_model: Any | None = None
) -> dict[str, float]:
    """Fill old/ref log-probs and token weights (no grad); returns weights/* stats.

    Visual-dependency weights score only the rows they apply to (`weighting.apply_to`: the expert rows by
    default, one in G): both passes, with the image and blanked, run on those rows alone, and the pass
    with the image is the old-log-prob pass itself when the update is off-policy."""
    kind, micro, w = config.weighting.kind, config.micro_batch_size, config.weighting
    temperature = scoring_temperature(config)  # old, ref and blank-image log-probs score like the loss
    off_policy = is_off_policy(config, batch.size)
    mask = batch.seq.response_mask
    chosen = selected_tokens(mask, w.apply_to, batch.expert_mask)  # [B, T]
    logp_img = entropy = logp_blank = None
    if off_policy or kind == "entropy":
        logp_img, entropy = batched_logprobs(
            model, batch.seq, micro, with_entropy=kind == "entropy", temperature=temperature
        )
    if off_policy:
        batch.old_logprobs = logp_img
    rows = chosen.any(-1).nonzero().squeeze(-1)  # [R]  rows whose tokens get weights
    if kind == "visual_dependency" and rows.numel() == 0:  # e.g. grpo with apply_to expert: nothing to weigh
        logp_blank = torch.zeros(mask.shape, dtype=torch.float32)
        logp_img = logp_blank if logp_img is None else logp_img
    elif kind == "visual_dependency":
        if logp_img is None:
            logp_img = _rows_logprobs(model, batch.seq, rows, micro, temperature)
        fill = 0 if w.blank_fill == "black" else w.blank_fill
        blank = collate_sequences(
            processor,
            [batch.prompts[r] for r in rows.tolist()],
            blank_images([batch.images[r] for r in rows.tolist()], fill),  # same sizes: same token layout
            [batch.responses[r] for r in rows.tolist()],
            batch.max_response_tokens,
        )
        logp_blank = _scatter_rows(
            batched_logprobs(model, blank, micro, temperature=temperature)[0], rows, mask
        )
    if ref_model is not None:
        batch.ref_logprobs, _ = batched_logprobs(ref_model, batch.seq, micro, temperature=temperature)
    batch.token_weights = compute_token_weights(
        kind,
        response_mask=mask,
        expert_mask=batch.expert_mask,
        logprobs_with_image=logp_img,
        logprobs_blank=logp_blank,
        entropy=entropy,
        w_min=w.w_min,
        w_max=w.w_max,
        alpha=w.alpha,
        apply_to=w.apply_to,
        method=w.normalise,
        top_k=w.top_k,
    )
    return weight_stats(batch.token_weights, chosen, w_min=w.w_min, w_max=w.w_max)


def _rows_logprobs(model: Any, seq: SequenceBatch, rows: Tensor, micro: int, temperature: float) -> Tensor:
    """No-grad log-probs of `rows` only, as a [B, T] tensor (0 on the other rows)."""
    part = batched_logprobs(model, seq.select(rows), micro, temperature=temperature)[0]  # [R, T']
    return _scatter_rows(part, rows, seq.response_mask)


def _scatter_rows(part: Tensor, rows: Tensor, like: Tensor) -> Tensor:
    """[R, T'] values of `rows` placed in a [B, T] zero tensor shaped like `like` (columns align: right
    padded sequences start at column 0)."""
    full = torch.zeros(like.shape, dtype=torch.float32)
    width = min(part.shape[1], like.shape[1])
    full[rows, :width] = part[:, :width]
    return full


# -------------------------------------------------------------------------------------- objectives
class RLObjective:
    """GRPO / TGRL: `losses.TGRLLoss` with the config's switches (experts, if any, flagged per row)."""

    def __init__(self, config: TrainConfig):
        c = config.loss
        self.loss = TGRLLoss(
            aggregation=c.aggregation,
            clip_low=c.clip_low,
            clip_high=c.clip_high,
            clip=c.clip,
            expert_shaping=c.expert_shaping,
            shaping_gamma=c.shaping_gamma,
            kl_coef=c.kl_coef,
            entropy_coef=c.entropy_coef,
            max_response_len=c.constant_length or config.sampling.max_new_tokens,
            sft_coef=c.expert_sft_coef,
            sft_token_weight=c.expert_sft_token_weight,
        )
        self.needs_entropy = c.entropy_coef > 0
        self.config, self.mu = config, c.expert_sft_coef

    def at_step(self, step: int) -> None:
        """CHORD's mu for this step (decayed when `loss.expert_sft_coef_end` is set)."""
        c = self.config.loss
        if c.expert_sft_coef is not None:
            self.mu = chord_coef(step, self.config.steps, c.expert_sft_coef, c.expert_sft_coef_end,
                                 c.expert_sft_decay)  # fmt: skip

    def __call__(
        self, logprobs: Tensor, entropy: Tensor | None, mb: TrainBatch, totals: dict[str, int]
    ) -> tuple[Tensor, dict[str, Stat]]:
        old = logprobs.detach() if mb.old_logprobs is None else mb.old_logprobs  # [b, T]
        return self.loss(
            logprobs,
            old,
            mb.advantages,
            mb.seq.response_mask,
            expert_mask=mb.expert_mask,
            token_weights=mb.token_weights,
            ref_logprobs=mb.ref_logprobs,
            entropy=entropy,
            sft_coef=self.mu,
            **totals,
        )


class SFTObjective:
    """Supervised fine-tuning on the expert trajectories: `losses.sft_loss` (token mean, weighted)."""

    needs_entropy = False

    def __init__(self, config: TrainConfig):
        self.config = config

    def at_step(self, step: int) -> None:
        """Nothing depends on the step."""

    def __call__(
        self, logprobs: Tensor, entropy: Tensor | None, mb: TrainBatch, totals: dict[str, int]
    ) -> tuple[Tensor, dict[str, Stat]]:
        return sft_loss(
            logprobs,
            mb.seq.response_mask,
            mb.token_weights,
            num_valid_tokens_total=totals["num_valid_tokens_total"],
        )


OBJECTIVES = {"sft": SFTObjective, "grpo": RLObjective, "tgrl": RLObjective}


# ---------------------------------------------------------------------------------------- the update
def policy_update(
    accelerator: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    batch: TrainBatch,
    objective: Any,
    config: TrainConfig,
    step: int,
) -> dict[str, float]:
    """`ppo_epochs` passes; per minibatch one optimizer step over its micro-batches. Returns stats."""
    meter = StatsMeter()
    device = accelerator.device
    temperature = scoring_temperature(config)
    objective.at_step(step)
    for epoch in range(config.ppo_epochs):
        shuffle = torch.Generator().manual_seed(derived_seed(config.seed, "minibatch", step, epoch))
        order = torch.randperm(batch.size, generator=shuffle)  # [B]
        for minibatch in order.split(config.minibatch_size):
            totals = accumulation_totals(batch.seq.response_mask[minibatch], batch.expert_mask[minibatch])
            micro_batches = minibatch.split(config.micro_batch_size)
            for i, rows in enumerate(micro_batches):
                mb = batch.select(rows)
                mb = replace(mb, seq=mb.seq.to(device), **_tensors_to(mb, device))
                last = i == len(micro_batches) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    with accelerator.autocast():
                        logprobs, entropy = _training_logprobs(
                            accelerator, model, mb.seq, objective.needs_entropy, temperature
                        )  # [b, T]
                    loss, stats = objective(logprobs, entropy, mb, totals)
                    accelerator.backward(loss)
                meter.add_micro(stats)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            meter.end_optimizer_step(grad_norm)
    return meter.summary()


def _training_logprobs(
    accelerator: Any, model: Any, seq: SequenceBatch, with_entropy: bool, temperature: float
) -> tuple[Tensor, Tensor | None]:
    """The differentiable log-probs of a micro-batch; shared prompts encoded once unless the model is
    wrapped for distributed training (DDP/FSDP expect one forward per backward)."""
    score = {"with_entropy": with_entropy, "temperature": temperature}
    if accelerator.unwrap_model(model) is model:
        shared = shared_prefix_logprobs(model, seq, **score)
        if shared is not None:
            return shared
    return response_logprobs(model, seq, **score)


def scoring_temperature(config: TrainConfig) -> float:
    """The temperature the loss scores tokens at: the rollout's for RL (the distribution the samples came
    from), 1 for SFT (plain log-likelihood of the expert text: there are no rollouts)."""
    return 1.0 if config.algorithm == "sft" else config.sampling.temperature


def _tensors_to(mb: TrainBatch, device: Any) -> dict[str, Tensor | None]:
    names = ("advantages", "expert_mask", "old_logprobs", "ref_logprobs", "token_weights")
    return {n: None if getattr(mb, n) is None else getattr(mb, n).to(device) for n in names}
