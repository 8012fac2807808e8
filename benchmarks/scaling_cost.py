"""A cost model of one TGRL step for the 3B / 7B recipes on 8xH100 and on several nodes: memory per GPU,
rollout / training / visual-dependency / weight-sync time, step time and GPU-hours. Computed, not measured.

    .venv/bin/python benchmarks/scaling_cost.py      # results/scaling_cost.{json,md} + docs/scaling.md
    .venv/bin/python benchmarks/scaling_cost.py --mfu 0.25 --decode-tokens-per-s 1500   # other assumptions

Everything comes from the ASSUMPTIONS below (each stated with why) and from the recipes
(configs/qwen2.5-vl-{3b,7b}.yaml: problems per rank, G, token budgets, vLLM memory share, precision).
Parameter counts are computed from the models' published architectures (config.json of
Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct). No GPU ran this: use it to size a run and to see which term
dominates, then replace the assumptions by a measured step (perf/step_time_s in metrics.jsonl).

FLOPs (PaLM-style, weights' matmuls, 2 per parameter per token; attention added as 4 * L * d * s per
token at mean context s):
- rollout: prefill 2 P tokens_prompt (per distinct prompt: vLLM caches a group's shared prefix), decode at
  an assumed tokens/s per GPU (decode is memory-bound, not FLOP-bound, so a tokens/s figure is the honest
  input), but never faster than the longest response allows: max_new_tokens decode steps, each reading
  the bf16 weights from HBM (the long tail that stops rollouts from scaling down with the batch);
- training: fwd + bwd = 6 P per token of every row (prompt + response; the trainer encodes each group's
  prompt once, `shared_prefix_logprobs`, so prompt tokens count once per group), plus 2 P for the
  recomputation when activation checkpointing is on;
- the visual-dependency weights: two no-grad forwards (with the image and with a blank one) = 4 P per
  token (the extra forward is the blank one; the first is the behaviour log-prob pass);
- the vision tower: 2 P_vision per patch, in each forward that sees the image;
- weight sync: the bf16 weights gathered from FSDP shards and loaded into the colocated vLLM engine.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
BEGIN, END = "<!-- scaling_cost.py: begin -->", "<!-- scaling_cost.py: end -->"
GB = 1e9


# ------------------------------------------------------------------------------------ assumptions
@dataclass
class Assumptions:
    peak_bf16_flops: float = 989e12  # H100 SXM dense bf16 (NVIDIA datasheet, no sparsity)
    mfu: float = 0.35  # training fwd+bwd under FSDP bf16 (typical 30-45% for 3-8B dense at short seqs)
    prefill_mfu: float = 0.40  # vLLM prefill is compute-bound, large batches
    decode_tokens_per_s: float = 2500.0  # per GPU, 7B bf16, colocated vLLM (KV cache ~7 GB), long tail incl.
    small_model_decode_speedup: float = 1.6  # 3B decode vs 7B (fewer bytes of weights per token)
    hbm_bytes_per_s: float = 3.35e12  # H100 SXM HBM3
    decode_bandwidth_efficiency: float = 0.6  # share of HBM bandwidth one decode step achieves
    mean_response_tokens: float = 400.0  # of max_new_tokens 1024: RLVR responses on MathVista-like tasks
    prompt_text_tokens: float = 120.0  # chat template + question + choices
    image_side_px: int = 448  # data.image_size of the recipes
    nvlink_bytes_per_s: float = 450e9  # H100 NVLink 4, per GPU, one direction (900 GB/s bidirectional)
    internode_bytes_per_s: float = 50e9  # per GPU: 8 x 400 Gb/s InfiniBand NICs per node, one per GPU
    comm_overlap: float = 0.8  # share of FSDP all-gather / reduce-scatter hidden behind compute
    gpu_memory_bytes: float = 80e9  # H100 80 GB
    activation_checkpointing: bool = True  # the launcher's default for FSDP
    steps: int = 500  # train.steps of the recipes


@dataclass
class Model:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    vision_hidden: int = 1280
    vision_layers: int = 32
    vision_intermediate: int = 3420

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params_layers(self) -> float:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attn = h * h + 2 * h * kv + h * h + h + 2 * kv  # q, k, v (biases), o
        mlp = 3 * h * self.intermediate
        return self.layers * (attn + mlp + 2 * h)

    @property
    def params_embed(self) -> float:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params_vision(self) -> float:
        v, i = self.vision_hidden, self.vision_intermediate
        block = 3 * v * v + 3 * v + v * v + v + 3 * v * i + 2 * i + v + 2 * v
        merger = (4 * v) * (4 * v) + 4 * v + (4 * v) * self.hidden + self.hidden
        patch = 3 * 2 * 14 * 14 * v
        return self.vision_layers * block + merger + patch

    @property
    def params(self) -> float:
        return self.params_layers + self.params_embed + self.params_vision

    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2  # K and V, bf16


MODELS = {
    "qwen2.5-vl-3b": Model("Qwen2.5-VL-3B", 2048, 36, 16, 2, 11008, 151936, tied=True),
    "qwen2.5-vl-7b": Model("Qwen2.5-VL-7B", 3584, 28, 28, 4, 18944, 152064, tied=False),
}


@dataclass
class Recipe:  # from configs/<name>.yaml (train: and data: sections)
    problems_per_rank: int
    group_size: int
    micro_batch_size: int
    vllm_share: float
    max_new_tokens: int = 1024


def recipe(name: str) -> Recipe:
    """The sizes a shipped recipe (configs/<name>.yaml) trains with, read through the library's loader."""
    from tgrl_lib.recipe import load_config

    train = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml").train
    return Recipe(
        problems_per_rank=train.problems_per_step,
        group_size=train.group_size,
        micro_batch_size=train.micro_batch_size,
        vllm_share=train.backend.vllm.gpu_memory_utilization,
        max_new_tokens=train.sampling.max_new_tokens,
    )


RECIPES = {name: recipe(name) for name in ("qwen2.5-vl-3b", "qwen2.5-vl-7b")}


# ------------------------------------------------------------------------------------------ model
def image_tokens(a: Assumptions) -> tuple[int, int]:
    """(vision patches, LLM image tokens) of one image: 14 px patches, 2x2 merged into one token."""
    patches = (a.image_side_px // 14) ** 2
    return patches, patches // 4


def memory_per_gpu(m: Model, r: Recipe, a: Assumptions, world: int) -> dict[str, float]:
    """GB per GPU: FSDP-sharded fp32 master weights + grads + AdamW (16 B/param), activations of one
    micro-batch, fp32 logits of its responses, the colocated vLLM share (weights + KV cache)."""
    p = m.params
    _, img_tokens = image_tokens(a)
    seq = a.prompt_text_tokens + img_tokens + r.max_new_tokens  # the longest row a micro-batch can hold
    b, h = r.micro_batch_size, m.hidden
    # bytes per layer: 34 s b h in bf16 (Korthikanti et al. 2022, arXiv 2205.05198; flash attention drops
    # their 5 a s^2 b term); with checkpointing only each layer's bf16 input is kept, plus one layer rebuilt
    per_layer = 34 * b * seq * h
    if a.activation_checkpointing:
        acts = 2 * b * seq * h * m.layers + per_layer
    else:
        acts = per_layer * m.layers
    logits = b * r.max_new_tokens * m.vocab * 4 * 2  # fp32 logits and their gradient
    vllm = r.vllm_share * a.gpu_memory_bytes
    vllm_weights = 2 * p
    out = {
        "weights_fp32": 4 * p / world / GB,
        "grads_fp32": 4 * p / world / GB,
        "adamw_fp32": 8 * p / world / GB,
        "fsdp_unsharded_layers_bf16": 2 * 2 * (m.params_layers / m.layers) / GB,  # current + prefetched
        "activations": acts / GB,
        "logits_fp32": logits / GB,
        "vllm_share": vllm / GB,
        "vllm_kv_cache": max(vllm - vllm_weights, 0.0) / GB,
    }
    out["total"] = sum(v for k, v in out.items() if k != "vllm_kv_cache")
    out["ddp_total_unsharded"] = out["total"] + (16 * p / GB) * (1 - 1 / world)
    return out


def step_cost(m: Model, r: Recipe, a: Assumptions, world: int, nodes: int) -> dict[str, float]:
    """Seconds of one step per phase (every rank does the same share), tokens, and FLOPs."""
    p_lm = m.params_layers + m.vocab * m.hidden  # matmul weights per token (embedding lookups are free)
    patches, img_tokens = image_tokens(a)
    prompt = a.prompt_text_tokens + img_tokens
    groups = r.problems_per_rank  # per rank
    rows = groups * r.group_size
    response_tokens = rows * a.mean_response_tokens  # per rank (experts are about as long)
    train_tokens = groups * prompt + response_tokens  # prompts encoded once per group
    attn = 4 * m.layers * m.hidden * (prompt + a.mean_response_tokens / 2)  # per token, mean context
    per_token = 2 * p_lm + attn
    vision = 2 * m.params_vision * patches * groups  # one image per group, per forward
    peak = a.peak_bf16_flops
    # rollout: prefill of the distinct prompts, then decode at the assumed tokens/s
    decode_tps = a.decode_tokens_per_s * (a.small_model_decode_speedup if m.hidden < 3000 else 1.0)
    on_policy_tokens = groups * (r.group_size - 1) * a.mean_response_tokens  # 1 slot per group is the expert
    t_prefill = (groups * prompt * per_token + vision) / (peak * a.prefill_mfu)
    # the slowest response sets the end: max_new_tokens decode steps, each at least one read of the weights
    tail = r.max_new_tokens * 2 * m.params / (a.hbm_bytes_per_s * a.decode_bandwidth_efficiency)
    t_decode = max(on_policy_tokens / decode_tps, tail)
    # the no-grad passes: behaviour log-probs with the image + the blank-image counterfactual
    nograd_flops = 2 * (train_tokens * per_token + vision)
    t_nograd = nograd_flops / (peak * a.mfu)
    t_visual_dep = t_nograd / 2  # the extra forward TGRL adds (the blank image)
    # the update: fwd + bwd (+ recompute), one optimizer step
    factor = 4 if a.activation_checkpointing else 3
    train_flops = factor * (train_tokens * per_token + vision)
    t_train = train_flops / (peak * a.mfu)
    # FSDP traffic: params all-gathered in fwd and bwd per micro-batch (bf16), grads reduce-scattered once
    micro_batches = math.ceil(rows / r.micro_batch_size)
    bw = a.nvlink_bytes_per_s if nodes == 1 else a.internode_bytes_per_s
    shard = (world - 1) / world
    gathers = 2 * micro_batches * (2 * m.params) * shard + (4 * m.params) * shard
    t_comm = gathers / bw * (1 - a.comm_overlap)
    # weight sync into the colocated vLLM engine: gather whole bf16 weights on every rank, then load
    t_sync = 2 * m.params * shard / bw + 2 * m.params / 200e9  # + a device-side copy at ~200 GB/s
    phases = {
        "rollout_prefill_s": t_prefill,
        "rollout_decode_s": t_decode,
        "of_which_tail_floor_s": tail,
        "nograd_passes_s": t_nograd,
        "of_which_visual_dependency_s": t_visual_dep,
        "update_s": t_train,
        "fsdp_comm_exposed_s": t_comm,
        "weight_sync_s": t_sync,
    }
    step = sum(v for k, v in phases.items() if not k.startswith("of_which"))
    return phases | {
        "step_s": step,
        "rollout_tokens_per_rank": on_policy_tokens,
        "train_tokens_per_rank": train_tokens,
        "train_tflops_per_rank": (train_flops + nograd_flops) / 1e12,
        "problems_per_step": groups * world,
        "gpu_hours": step * a.steps * world / 3600.0,
        "hours": step * a.steps / 3600.0,
    }


def layouts() -> list[tuple[str, int, int]]:
    return [("8xH100", 8, 1), ("2x8xH100", 16, 2), ("4x8xH100", 32, 4)]


def run(a: Assumptions) -> dict:
    """Every (recipe, layout): the recipe as written (problems_per_step is per rank, so the global batch
    grows with the GPUs), and on more than 8 GPUs also the 8-GPU global batch split over more ranks."""
    rows = []
    for name, m in MODELS.items():
        base = RECIPES[name]
        global_8 = base.problems_per_rank * 8
        for label, world, nodes in layouts():
            batches = [("per rank as recipe", base)]
            if world > 8:
                batches.append(("same global batch", replace(base, problems_per_rank=global_8 // world)))
            for batch, r in batches:
                cost = step_cost(m, r, a, world, nodes)
                cost["gpu_hours_per_1k_problems"] = (
                    cost["gpu_hours"] / (cost["problems_per_step"] * a.steps) * 1e3
                )
                rows.append({
                    "recipe": name, "layout": label, "batch": batch, "gpus": world, "nodes": nodes,
                    "problems_per_rank": r.problems_per_rank, "params_b": m.params / 1e9,
                    "vision_params_b": m.params_vision / 1e9, "memory_gb": memory_per_gpu(m, r, a, world),
                    "cost": cost,
                })  # fmt: skip
    return {"assumptions": asdict(a), "rows": rows}


# ----------------------------------------------------------------------------------------- report
def render(result: dict, command: str) -> str:
    a = result["assumptions"]
    lines = [
        "# Scaling cost model (computed, not measured)",
        "",
        f"Written by `{command}` (benchmarks/scaling_cost.py). Assumptions:",
        "",
        *[f"- `{k}` = {v:g}" if isinstance(v, float) else f"- `{k}` = {v}" for k, v in a.items()],
        "",
        "## Memory per GPU (GB), FSDP full shard",
        "",
        "| recipe | layout | params (B) | weights+grads+AdamW | activations | logits | vLLM share "
        "(KV cache) | total | DDP instead |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if row["batch"] != "per rank as recipe":
            continue
        mem = row["memory_gb"]
        states = mem["weights_fp32"] + mem["grads_fp32"] + mem["adamw_fp32"]
        lines.append(
            f"| {row['recipe']} | {row['layout']} | {row['params_b']:.2f} | {states:.1f} | "
            f"{mem['activations']:.1f} | {mem['logits_fp32']:.1f} | {mem['vllm_share']:.1f} "
            f"({mem['vllm_kv_cache']:.1f}) | {mem['total']:.1f} | {mem['ddp_total_unsharded']:.1f} |"
        )
    lines += [
        "",
        "## One step (seconds per phase; every rank does the same share)",
        "",
        "| recipe | layout | problems/step (per rank) | prefill | decode (tail floor) "
        "| no-grad (visual dep.) | update | FSDP comm | weight sync | step | hours, all steps | GPU-hours "
        "| GPU-h / 1k problems |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        c = row["cost"]
        seconds = [c["rollout_prefill_s"], f"{c['rollout_decode_s']:.1f} ({c['of_which_tail_floor_s']:.1f})"]
        seconds += [f"{c['nograd_passes_s']:.1f} ({c['of_which_visual_dependency_s']:.1f})"]
        seconds += [c[k] for k in ("update_s", "fsdp_comm_exposed_s", "weight_sync_s", "step_s", "hours")]
        cells = [row["recipe"], row["layout"], f"{c['problems_per_step']} ({row['problems_per_rank']})"]
        cells += [x if isinstance(x, str) else f"{x:.1f}" for x in seconds] + [f"{c['gpu_hours']:.0f}"]
        cells += [f"{c['gpu_hours_per_1k_problems']:.2f}"]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Assumptions()
    for key, value in asdict(defaults).items():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        parser.add_argument("--" + key.replace("_", "-"), type=kind, default=value)
    parser.add_argument("--out", default=str(RESULTS / "scaling_cost"), help="path stem of .json / .md")
    parser.add_argument("--docs", default=str(DOCS), help="page whose generated block to rewrite ('' = none)")
    args = parser.parse_args()
    a = Assumptions(**{k: getattr(args, k) for k in asdict(defaults)})
    result = run(a)
    changed = [f"--{k.replace('_', '-')} {v}" for k, v in asdict(a).items() if v != getattr(defaults, k)]
    command = " ".join([".venv/bin/python benchmarks/scaling_cost.py", *changed])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result | {"command": command}, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(result, command))
    if args.docs:
        update_docs(Path(args.docs), render(result, command))
    print(render(result, command))


def update_docs(page: Path, table: str) -> None:
    """Replace the text between the page's BEGIN / END markers with the freshly rendered tables."""
    text = page.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{page}: no {BEGIN} ... {END} block to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    body = table.split("\n", 2)[2].replace("\n## ", "\n### ")  # without the title, one level down
    page.write_text(f"{head}{BEGIN}\n{body}{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    main()
