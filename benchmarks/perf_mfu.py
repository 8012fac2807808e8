"""Rollout and training throughput against the machine's measured fp32 matmul peak (MFU).

    .venv/bin/python benchmarks/perf_mfu.py                 # ~2-4 min on 2 cores
    .venv/bin/python benchmarks/perf_mfu.py --threads 1 --steps 7

1. Peak: the best median GFLOP/s of square fp32 `torch.mm` (512..2048) with the run's thread count.
2. Work: our trainer on the `perf_common` workload, once as GRPO (no token weights) and once as TGRL with
   visual-dependency weights (the tiny-cpu recipe), timing each phase of every step:
   rollout (`generate`), the no-grad passes (`update.prepare_batch`) and the update (`policy_update`).
3. Model FLOPs per phase from the actual batch shapes (PaLM-style: weights' matmuls, attention added),
   counting the work the step needs, not what an implementation happens to execute: each distinct
   prompt (a group's G rows share one) is encoded once, with its image (2 * P_vision per patch), at
   2 * P_layers per token (P_layers = the language model's transformer blocks) plus causal attention
   4 * L * d_attn per (query, key) pair; every row's response tokens then cost 2 * P_layers, plus
   2 * P_head for their logits (the tied 744 x 128 LM head), plus attention to the prompt and to the
   earlier response tokens. The rollout needs the same with its 48 generated tokens per row; fwd+bwd is
   3x the forward; the weighting passes are 2 forwards.
   For comparison, the FLOPs that actually ran in the last step are counted with torch's
   `FlopCounterMode` (matmuls and convolutions; torch does not count CPU attention kernels): HF
   `generate` prefills every row's prompt, so the rollout executes more than it needs.
4. MFU of a phase = model FLOPs / phase time / peak, per step with the peak probed (2048 x 2048 matmul)
   just before that step, since the shared machine's available peak moves; medians over the timed steps.
   Tokens/s are the trainer's own `perf/*` metrics.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_common import (
    Provenance,
    entry_point,
    measured,
    prepare_workdir,
    run_ours,
    save_result,
)

VARIANTS = {
    "grpo": {"algorithm": "grpo", "weighting": {"kind": "none"}},
    "tgrl_visual_dependency": {"algorithm": "tgrl", "weighting": {"kind": "visual_dependency"}},
}


def probe_peak(n: int = 2048, repeats: int = 2) -> float:
    """GFLOP/s of the fastest of `repeats` n x n fp32 matmuls: the peak available right now."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def matmul_peak(threads: int, sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 5) -> dict:
    """Best median GFLOP/s of an n x n fp32 matmul over `sizes`."""
    import torch

    torch.set_num_threads(threads)
    results = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        results[str(n)] = 2 * n**3 / statistics.median(times) / 1e9
    return {"gflops_by_size": results, "peak_gflops": max(results.values())}


def model_sizes(model: Any) -> dict[str, int]:
    lm = model.model.language_model
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return {
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_layers": sum(p.numel() for p in lm.layers.parameters()),
        "params_head": model.lm_head.weight.numel(),
        "params_vision": sum(p.numel() for p in model.model.visual.parameters()),
        "layers": text.num_hidden_layers,
        "attention_width": text.num_attention_heads * head_dim,
    }


def forward_flops(sizes: dict, prompts: list[int], rows: list[tuple[int, int]], patches: int) -> float:
    """Forward FLOPs a batch needs: each distinct prompt (`prompts`: their lengths) once, with its image,
    then every row's response (`rows`: (prompt length, response length)) through the LM head, attending
    to its prompt and its own earlier tokens."""
    p_layers, p_head = sizes["params_layers"], sizes["params_head"]
    attention = 4 * sizes["layers"] * sizes["attention_width"]  # per (query, key) pair: QK^T and AV
    total = 0.0
    for n in prompts:
        total += 2 * p_layers * n + attention * n * (n + 1) / 2 + 2 * sizes["params_vision"] * patches
    for p, r in rows:
        total += (2 * p_layers + 2 * p_head) * r + attention * (p * r + r * (r + 1) / 2)
    return total


class PhaseMeter:
    """Wraps the trainer's phase functions: wall time per call, batch shapes, FLOPs counted when on."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.count = False
        self.peak = 0.0  # GFLOP/s probed just before the current step
        self.originals: list[tuple[Any, str, Any]] = []

    def wrap(self, module: Any, name: str, shapes: Any) -> None:
        inner = getattr(module, name)
        self.originals.append((module, name, inner))

        def timed(*args: Any, **kwargs: Any) -> Any:
            from torch.utils.flop_counter import FlopCounterMode

            record: dict[str, Any] = {"phase": name, "peak_gflops": self.peak}
            counter = FlopCounterMode(display=False) if self.count else None
            start = time.perf_counter()
            if counter is not None:
                with counter:
                    out = inner(*args, **kwargs)
                record["counted_flops"] = counter.get_total_flops()
            else:
                out = inner(*args, **kwargs)
            record["seconds"] = time.perf_counter() - start
            record.update(shapes(args, kwargs, out))
            self.calls.append(record)
            return out

        setattr(module, name, timed)

    def restore(self) -> None:
        for module, name, inner in reversed(self.originals):
            setattr(module, name, inner)


def _batch_shapes(args: tuple, kwargs: dict, out: Any) -> dict[str, Any]:
    batch = next(a for a in args if hasattr(a, "seq"))
    seq = batch.seq
    lengths = seq.attention_mask.sum(-1).tolist()
    responses = seq.response_mask.sum(-1).tolist()
    prompts = [n - r for n, r in zip(lengths, responses, strict=True)]
    distinct = {(batch.prompts[b], id(batch.images[b])): prompts[b] for b in range(len(prompts))}
    return {
        "prompts": list(distinct.values()),  # distinct (prompt, image) pairs: a group's rows share one
        "rows": list(zip(prompts, responses, strict=True)),
        "patches_per_row": int(seq.image_grid_thw[0].prod()) if seq.image_grid_thw is not None else 0,
    }


def _rollout_shapes(args: tuple, kwargs: dict, out: Any) -> dict[str, Any]:
    groups = args[1]
    return {"generated": out, "rows": sum(len(g.samples) for g in groups)}


def run_variant(paths: dict[str, Path], steps: int, overrides: dict, sizes: dict) -> dict:
    import tgrl_lib.rl.trainer
    import tgrl_lib.rl.update

    meter = PhaseMeter()
    meter.wrap(tgrl_lib.rl.trainer, "rollout", _rollout_shapes)
    meter.wrap(tgrl_lib.rl.update, "prepare_batch", _batch_shapes)
    meter.wrap(tgrl_lib.rl.update, "policy_update", _batch_shapes)
    original_step = tgrl_lib.rl.trainer.train_step

    def step_with_count(run: Any, step: int) -> dict[str, float]:
        meter.count = step == steps  # count FLOPs in the last (untimed) step only
        meter.peak = probe_peak()  # the machine is shared: the peak each step had at hand
        return original_step(run, step)

    tgrl_lib.rl.trainer.train_step = step_with_count
    try:
        result = run_ours(paths, steps, **overrides)
    finally:
        tgrl_lib.rl.trainer.train_step = original_step
        meter.restore()
    passes = 2 if overrides["weighting"]["kind"] == "visual_dependency" else 0  # real + blank images
    return summarise_variant(meter.calls, result, sizes, passes)


def summarise_variant(calls: list[dict], result: dict, sizes: dict, no_grad_passes: int) -> dict:
    by_phase: dict[str, list[dict]] = {}
    for c in calls:
        by_phase.setdefault(c["phase"], []).append(c)
    rollouts = by_phase["rollout"]
    updates = by_phase["policy_update"]
    prepares = by_phase["prepare_batch"]
    out: dict[str, Any] = {"no_grad_passes": no_grad_passes, "phases": {}}
    totals: list[float] = []  # model FLOPs per step, all phases
    for name, records in (("rollout", rollouts), ("prepare_batch", prepares), ("policy_update", updates)):
        flops = []
        for k, r in enumerate(records):
            batch = updates[k]
            if name == "rollout":  # each prompt, then every row's generated tokens
                generated = round(r["generated"] / r["rows"])
                rows = [(p, generated) for p, _ in batch["rows"]]
                total = forward_flops(sizes, batch["prompts"], rows, batch["patches_per_row"])
            else:
                passes = no_grad_passes if name == "prepare_batch" else 3  # fwd + bwd = 3 forwards
                total = passes * forward_flops(
                    sizes, batch["prompts"], batch["rows"], batch["patches_per_row"]
                )
            flops.append(total)
        timed = measured(list(range(len(records))))  # step 1 and the (counted) last step left out
        counted = records[-1].get("counted_flops")
        out["phases"][name] = {
            "seconds_median": statistics.median(records[i]["seconds"] for i in timed),
            "model_gflops_per_step": statistics.median(flops[i] for i in timed) / 1e9,
            "counted_gflops_last_step": None if counted is None else counted / 1e9,
            "gflops_per_s": statistics.median(flops[i] / records[i]["seconds"] / 1e9 for i in timed),
            "mfu": statistics.median(
                flops[i] / records[i]["seconds"] / 1e9 / records[i]["peak_gflops"] for i in timed
            ),
        }
        totals = [a + b for a, b in zip(totals, flops, strict=True)] if totals else flops
    timed = measured(list(range(len(rollouts))))
    step_s = result["step_time_s"]  # the trainer's own, inside train_step (the peak probe is outside)
    out["step_s_median"] = statistics.median(step_s[i] for i in timed)
    out["step_mfu"] = statistics.median(
        totals[i] / step_s[i] / 1e9 / rollouts[i]["peak_gflops"] for i in timed
    )
    out["peak_gflops_median"] = statistics.median(rollouts[i]["peak_gflops"] for i in timed)
    out["peak_gflops_range"] = [
        min(r["peak_gflops"] for r in rollouts),
        max(r["peak_gflops"] for r in rollouts),
    ]
    out["rollout_tokens_per_s_median"] = statistics.median(measured(result["rollout_tokens_per_s"]))
    out["tokens_per_s_median"] = statistics.median(measured(result["tokens_per_s"]))
    out["trained_tokens_per_step"] = statistics.median(result["trained_tokens"])
    out["update_tokens_per_s"] = (
        out["trained_tokens_per_step"] / out["phases"]["policy_update"]["seconds_median"]
    )
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=7, help="steps per variant (first and last not timed)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads")
    args = parser.parse_args(argv)
    import torch

    from tgrl_lib.models.policy import load_policy

    run = Provenance("benchmarks/perf_mfu.py", argv)
    torch.set_num_threads(args.threads)
    peak_before = matmul_peak(args.threads)
    variants = {}
    with tempfile.TemporaryDirectory(prefix="perf_mfu_") as tmp:
        paths = prepare_workdir(Path(tmp))
        sizes = model_sizes(load_policy(paths["model"]).model)
        for name, overrides in VARIANTS.items():
            variants[name] = run_variant(paths, args.steps, overrides, sizes)
    peak_after = matmul_peak(args.threads)
    result = {
        "benchmark": "mfu",
        **run.fields(args),
        "matmul_peak_start": peak_before,
        "matmul_peak_end": peak_after,
        "model": sizes,
        "variants": variants,
    }
    path = save_result("mfu", result)
    print(f"wrote {path}; peak {peak_before['peak_gflops']:.1f} GFLOP/s")
    for name, v in variants.items():
        phases = ", ".join(f"{k} {100 * p['mfu']:.2f}%" for k, p in v["phases"].items())
        print(f"{name}: step MFU {100 * v['step_mfu']:.2f}% ({phases})")
    return 0


if __name__ == "__main__":
    entry_point(main)
