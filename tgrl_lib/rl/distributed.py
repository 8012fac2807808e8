"""Training on several processes: what each rank draws, how the update stays the single-process update on
the global batch, and what is reduced before logging.

Launch: `torchrun --nproc_per_node N -m tgrl_lib.cli train ...` or `accelerate launch --num_processes N -m
tgrl_lib.cli train ...` (see `tgrl_lib.rl.launcher`). `accelerate` wraps the model in DDP (or FSDP, from
the launcher's config) and averages gradients; the rest is here:

- Problems: every rank draws the same `problems_per_step * N` indices from the same `DataCursor` and keeps
  the strided share `shard(indices, rank, N)`, so whole groups live on one rank (a group's advantage needs
  all G of its rewards) and the cursor stays identical on every rank. `problems_per_step` is per rank: the
  global batch is N times it, as with a per-device batch size.
- Loss normaliser: the losses divide by token / sequence counts of the optimizer step (`accumulation_totals`).
  `GlobalTotals` replaces those counts by their sum over ranks and multiplies the loss by N, so DDP's mean of
  the per-rank gradients is the gradient of the global token mean (a plain DDP mean of per-rank token means
  weighs a rank's tokens by 1 / its own count). Same for the loss stats.
- Balance: DDP needs the same number of forward / backward passes on every rank. Groups dropped by the
  zero-variance filter (or sft problems without an eligible expert) differ per rank, so `balance` trims every
  rank to the smallest row count (whole groups, from the end) and skips the update on all ranks when that
  leaves nothing or row counts still differ.
- Seeds: rollouts of rank r use `rank_seed` (the single-process seed when N = 1).
- Metrics: `reduce_metrics` averages each key over the ranks that report it, before rank 0 logs; each
  rank also keeps its own unreduced rows in `output_dir/ranks/rank-<r>.jsonl` (`rank_logger`).
- RNG state: `gather_rng_states` collects every rank's state for the checkpoint (rank 0 writes it once),
  `rank_rng_state` picks a rank's own on resume.
- FSDP (FSDP2 through accelerate, GPU only): `whole_state` gathers the sharded weights and optimizer
  state into whole tensors for rank 0's checkpoint (a collective: every rank calls it),
  `load_optimizer_state` shards them back on resume, `whole_tensors` streams whole weights into each
  rank's vLLM engine, and `check_supported` refuses what would hang: every forward of an FSDP model is a
  collective, so ranks must run the same number, which per-rank `hf` generation and the in-loop
  likelihood filter (a forward per rank's expert candidates) do not. Not run here: this machine has no
  GPUs, and accelerate uses DDP whenever it runs on CPU.

Not global (our choice, stated): token weights are normalised to mean 1 per rank's batch, and
`advantage_scale: batch` uses the rank's batch std; both equal the single-process values only on one rank.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tgrl_lib.env import read_env
from tgrl_lib.errors import TgrlError
from tgrl_lib.rl.rollout import derived_seed
from tgrl_lib.rl.stats import LossTerm

log = logging.getLogger(__name__)


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun / accelerate launch (1 when started plainly)."""
    value = read_env("WORLD_SIZE", "1") or "1"
    try:
        return max(int(value), 1)
    except ValueError:
        raise TgrlError(f"WORLD_SIZE={value!r} is not an integer", hint="launch with torchrun") from None


def launched_rank() -> int:
    """RANK set by torchrun / accelerate launch (0 when started plainly)."""
    value = read_env("RANK", "0") or "0"
    return int(value) if value.isdigit() else 0


def make_accelerator(mixed_precision: str) -> Any:
    """An `Accelerator` for this process; on a machine without CUDA several ranks use gloo on CPU.

    accelerate only forms a CPU process group when asked (`cpu=True`); without it N launched processes
    would each train alone and all write as rank 0, so a mismatch is refused."""
    import torch
    from accelerate import Accelerator

    world = launched_world_size()
    cpu = world > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    if accelerator.num_processes != world:
        raise TgrlError(
            f"launched with WORLD_SIZE={world} but accelerate formed {accelerator.num_processes} process(es)",
            hint="launch with torchrun --nproc_per_node N or accelerate launch --num_processes N",
        )
    return accelerator


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """Rank `rank`'s strided share of `items` (whole items: a problem's group never spans ranks).

    >>> shard([0, 1, 2, 3, 4], 1, 2)
    [1, 3]
    """
    return list(items[rank::world])


def rank_seed(seed: int, label: str, step: int, rank: int, world: int) -> int:
    """The sampling seed of (label, step) on `rank`: the single-process seed when world == 1."""
    if world == 1:
        return derived_seed(seed, label, step)
    return derived_seed(seed, label, step, "rank", rank)


# ------------------------------------------------------------------------------------ collectives
def _world(accelerator: Any) -> int:
    return int(accelerator.num_processes)


def all_gather(accelerator: Any, value: Any) -> list[Any]:
    """`value` of every rank, in rank order (a picklable object; [value] on one process)."""
    if _world(accelerator) == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * _world(accelerator)
    dist.all_gather_object(out, value)
    return out


def balance(accelerator: Any, groups: list[Any]) -> tuple[list[Any], int, bool]:
    """Trim every rank to the smallest row count over ranks (whole groups, from the end).

    Returns (groups kept, groups dropped here, whether every rank now has the same non-zero row count;
    when False every rank must skip the update)."""
    rows = sum(len(g.samples) for g in groups)
    target = min(all_gather(accelerator, rows))
    kept, count = [], 0
    for group in groups:
        if count + len(group.samples) > target:
            break
        kept.append(group)
        count += len(group.samples)
    counts = all_gather(accelerator, count)
    balanced = len(set(counts)) == 1 and counts[0] > 0
    return kept, len(groups) - len(kept), balanced


class GlobalTotals:
    """An objective whose loss normalisers are summed over ranks, with loss (and loss stats) times N.

    With N ranks DDP averages gradients: (1/N) sum_r grad(L_r * N / T) = grad(sum_r L_r / T), the gradient
    of the loss over the global batch (T: the global token or sequence count of the optimizer step)."""

    def __init__(self, objective: Any, accelerator: Any):
        self.objective = objective
        self.accelerator = accelerator
        self.needs_entropy = objective.needs_entropy

    def __call__(self, logprobs: Any, entropy: Any, mb: Any, totals: dict[str, int]) -> tuple[Any, dict]:
        world = _world(self.accelerator)
        if world == 1:
            return self.objective(logprobs, entropy, mb, totals)
        import torch
        import torch.distributed as dist

        keys = sorted(totals)
        counts = torch.tensor([int(totals[k]) for k in keys], dtype=torch.int64)
        dist.all_reduce(counts)  # gloo and nccl both sum int64 (nccl wants it on the device)
        summed = dict(zip(keys, (int(c) for c in counts.tolist()), strict=True))
        loss, stats = self.objective(logprobs, entropy, mb, summed)
        scaled = {k: LossTerm(v.value * world) if isinstance(v, LossTerm) else v for k, v in stats.items()}
        return loss * world, scaled

    def at_step(self, step: int) -> None:
        """Schedules of the wrapped objective (e.g. CHORD's decaying mu) follow the optimizer step."""
        self.objective.at_step(step)


def rank_logger(accelerator: Any, output_dir: Path) -> Any | None:
    """With several ranks, `output_dir/ranks/rank-<r>.jsonl`: this rank's own metrics before the reduction
    (diagnostics: imbalance, per-rank step times); None on one process."""
    if _world(accelerator) == 1:
        return None
    from tgrl_lib.metrics_log import JsonlLogger

    return JsonlLogger(output_dir / "ranks" / f"rank-{accelerator.process_index}.jsonl")


def reduce_metrics(accelerator: Any, metrics: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the ranks that report it (every rank gets the same dict)."""
    if _world(accelerator) == 1:
        return metrics
    per_rank = all_gather(accelerator, {k: float(v) for k, v in metrics.items()})
    keys = sorted({k for m in per_rank for k in m})
    out = {}
    for key in keys:
        values = [m[key] for m in per_rank if key in m]
        out[key] = sum(values) / len(values)
    return out


# ------------------------------------------------------------------------------------------- RNG
def gather_rng_states(accelerator: Any, state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint's `rng.pt` holds: this state with one process, every rank's with several."""
    if _world(accelerator) == 1:
        return state
    return {"world_size": _world(accelerator), "ranks": all_gather(accelerator, state)}


def rank_rng_state(saved: dict[str, Any], rank: int, world: int) -> dict[str, Any] | None:
    """This rank's RNG state from a checkpoint's `rng.pt` (None when the checkpoint had fewer ranks)."""
    if "ranks" not in saved:  # written by one process
        if world > 1:
            log.warning("checkpoint RNG state is from 1 process, resuming on %d ranks", world)
        return saved if rank == 0 else None
    ranks = saved["ranks"]
    if len(ranks) != world:
        log.warning("checkpoint RNG state is from %d ranks, resuming on %d", len(ranks), world)
    return ranks[rank] if rank < len(ranks) else None


# ------------------------------------------------------------------------------------------- FSDP
def uses_fsdp(accelerator: Any) -> bool:
    return str(getattr(accelerator, "distributed_type", "")).endswith("FSDP")


def check_supported(accelerator: Any, config: Any) -> None:
    """Refuse settings whose forwards differ in number between ranks under FSDP (each one a collective)."""
    if not uses_fsdp(accelerator):
        return
    if config.algorithm != "sft" and config.backend.kind == "hf":
        raise TgrlError(
            "FSDP with backend.kind hf would hang: each rank generates its own number of tokens",
            hint="use train.backend.kind: vllm, or launch with --train-strategy ddp",
        )
    if config.in_loop_filter.min_logprob is not None:
        raise TgrlError(
            "FSDP with train.in_loop_filter.min_logprob would hang: ranks score different numbers of experts",
            hint="apply the likelihood filter before training (tgrl filter), or launch with ddp",
        )


def whole_state(accelerator: Any, model: Any, optimizer: Any) -> tuple[dict | None, dict | None]:
    """(model, optimizer) state dicts with whole tensors on CPU under FSDP (None, None otherwise: the plain
    state dicts are whole already). A collective: every rank calls it; rank 0 writes the result."""
    if not uses_fsdp(accelerator):
        return None, None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options)


def whole_tensors(accelerator: Any, model: Any) -> Any:
    """(name, tensor) of the model's weights for a generator's weight sync: under FSDP each sharded tensor
    is gathered when the consumer reaches it (a collective per tensor, the same order on every rank), so
    every rank's colocated engine gets whole weights. (`VLLMBackend.load_weights` lists them first: a whole
    fp32 copy per GPU for the length of the sync.)"""
    items = model.state_dict().items()
    if not uses_fsdp(accelerator):
        return iter(items)
    return ((k, v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in items)


def load_optimizer_state(accelerator: Any, model: Any, optimizer: Any, state: dict) -> None:
    """Restore a checkpoint's optimizer state (whole tensors), sharding it again under FSDP."""
    if not uses_fsdp(accelerator):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(model, inner, state, options=StateDictOptions(full_state_dict=True))
