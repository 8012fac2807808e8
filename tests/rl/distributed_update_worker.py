"""One policy update on a fixed global batch, on however many ranks it is launched with (torchrun, gloo).

    python tests/rl/distributed_update_worker.py MODEL_DIR OUT_DIR [--plain]

Every rank builds the same 4 groups (random response lengths, so token counts differ per rank; one expert
per group), keeps its `distributed.shard`, and runs `prepare_batch` + `policy_update` with SGD (the step is
then linear in the gradient). `--plain` skips `distributed.GlobalTotals` (the negative control: each rank
normalises by its own token count). Rank 0 writes OUT_DIR/{start,weights}.safetensors and metrics.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from tgrl_lib.config import TrainConfig
from tgrl_lib.data.prompts import render_prompt
from tgrl_lib.data.schema import Problem
from tgrl_lib.models.policy import load_policy
from tgrl_lib.rl import distributed
from tgrl_lib.rl.advantages import group_advantages
from tgrl_lib.rl.rollout import Group, Sample
from tgrl_lib.rl.update import OBJECTIVES, build_batch, policy_update, prepare_batch

REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]


def fixed_groups(policy) -> list[Group]:
    gen = torch.Generator().manual_seed(7)
    plain = len(policy.tokenizer) - 8  # the BPE entries; the 8 special tokens follow them
    groups = []
    for i, row in enumerate(REWARDS):
        problem = Problem(id=f"p{i}", image=f"images/p{i}.png", question=f"How many shapes ({i})?",
                          answer=str(i + 1), answer_type="integer")  # fmt: skip
        image = Image.new("RGB", (56, 56), (50 * i, 90, 200 - 30 * i))
        group = Group(problem, render_prompt(policy.processor, problem.question, None), image)
        for r in row[:-1]:
            n = int(torch.randint(2, 12, (1,), generator=gen))
            ids = tuple(torch.randint(0, plain, (n,), generator=gen).tolist())
            group.samples.append(Sample(text="", token_ids=ids, reward=r, correct=r > 0))
        expert = f"<think>I count {i + 1} shapes.</think><answer>{i + 1}</answer>"
        group.samples.append(
            Sample(text=expert, token_ids=None, is_expert=True, reward=row[-1], correct=True)
        )
        groups.append(group)
    return groups


def _plain(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def main(model_dir: str, out_dir: str, plain: bool) -> None:
    config = TrainConfig(
        model=model_dir, ppo_epochs=2, minibatch_size=64, micro_batch_size=2, group_size=4, lr=0.5,
        max_grad_norm=1e6, weighting={"kind": "none"}, advantage_scale="group",
    )  # fmt: skip
    accelerator = distributed.make_accelerator("no")
    torch.manual_seed(0)
    policy = load_policy(model_dir, dtype="float32")
    start = _plain(policy.model)
    optimizer = torch.optim.SGD(policy.model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    model, optimizer = accelerator.prepare(policy.model.train(), optimizer)
    rank, world = accelerator.process_index, accelerator.num_processes
    groups = distributed.shard(fixed_groups(policy), rank, world)
    rewards = torch.tensor([[s.reward for s in g.samples] for g in groups])  # [N, G]
    advantages = group_advantages(rewards, scale=config.advantage_scale)
    batch = build_batch(policy.processor, groups, advantages, 64)
    unwrapped = accelerator.unwrap_model(model)
    metrics = prepare_batch(batch, unwrapped, policy.processor, config)
    objective = OBJECTIVES[config.algorithm](config)
    if not plain:
        objective = distributed.GlobalTotals(objective, accelerator)
    metrics |= policy_update(accelerator, model, optimizer, scheduler, batch, objective, config, step=1)
    metrics["tokens/response"] = float(batch.seq.response_mask.sum())
    reduced = distributed.reduce_metrics(accelerator, metrics)
    if accelerator.is_main_process:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(_plain(accelerator.unwrap_model(model)), str(out / "weights.safetensors"))
        save_file(start, str(out / "start.safetensors"))
        (out / "metrics.json").write_text(json.dumps(reduced, indent=1, sort_keys=True))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--plain" in sys.argv[3:])
