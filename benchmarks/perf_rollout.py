"""Rollout tokens/s of the sampler options on the same prompts and the same sampling distribution.

    .venv/bin/python benchmarks/perf_rollout.py                # ~3-6 min on 2 busy cores
    .venv/bin/python benchmarks/perf_rollout.py --rounds 12 --compile

The tiny-cpu recipe's rollout (`perf_common.WORKLOAD`: 8 problems x G = 8, exactly 48 new tokens per
response, temperature 1, top-k/top-p off, image/video ids suppressed, fp32, one thread) through:

| arm | what |
|---|---|
| `generate` | HF `generate`, dynamic cache, `num_return_sequences=G` (the rollout before this change) |
| `generate_static` | the same with `cache_implementation="static"` (a preallocated cache) |
| `generate_static_compile` | the same with the model's forward `torch.compile`d (`--compile`; CPU inductor) |
| `decode` | `generation.decode` (what `HFBackend` uses now): one prefill per prompt, shared prompt cache |

(`decode`: the prompt cache shared by the G rows, a preallocated cache, a loop over the model's modules.)

One process; each round runs every arm once on the same batch in a rotated order (the load of the
shared cores moves within a minute; rotation spreads it over the arms), after a warm-up round. A call's
tokens/s is 3072 new tokens over its wall time; the result is the median over rounds of each arm's
ratio to `generate` in the same round. Results: `results/perf_rollout.json`, rendered into `perf.md`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_common import WORKLOAD, Provenance, prepare_workdir, save_result


def _batch(paths: dict[str, Path]) -> tuple[Any, list[str], list[Any]]:
    from PIL import Image

    from tgrl_lib.data.prompts import render_prompt
    from tgrl_lib.data.schema import load_dataset
    from tgrl_lib.models.policy import load_policy

    policy = load_policy(paths["model"])
    records = load_dataset(paths["problems"], "problems").records[: WORKLOAD["problems_per_step"]]
    prompts = [render_prompt(policy.processor, p.question, p.choices) for p in records]
    images = [Image.open(paths["problems"] / p.image).convert("RGB") for p in records]
    return policy, prompts, images


def make_arms(policy: Any, compile_arm: bool) -> dict[str, Any]:
    """arm name -> a call generating the workload's rollout, returning the number of new tokens."""
    import torch

    from tgrl_lib.generation.hf import HFBackend
    from tgrl_lib.models.collate import collate_prompts

    G, new, temperature = WORKLOAD["group_size"], WORKLOAD["max_new_tokens"], WORKLOAD["temperature"]
    decode = HFBackend(policy.model, policy.processor, sampler="decode")
    plain = HFBackend(policy.model, policy.processor, sampler="generate")

    def backend_arm(backend: HFBackend):
        def run(prompts, images, seed):
            out = backend.generate(
                prompts, images, samples=G, temperature=temperature, max_new_tokens=new, seed=seed
            )
            return sum(c.num_tokens for g in out for c in g)

        return run

    def static_arm(model: Any):
        def run(prompts, images, seed):
            inputs = collate_prompts(policy.processor, prompts, images)
            torch.manual_seed(seed)
            with torch.no_grad():
                seq = model.generate(
                    **inputs, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                    repetition_penalty=1.0, no_repeat_ngram_size=0, num_return_sequences=G,
                    max_new_tokens=new, eos_token_id=plain.stop_ids, pad_token_id=plain.tokenizer.pad_token_id,  # noqa: E501
                    suppress_tokens=plain.suppressed, cache_implementation="static",
                )  # fmt: skip
            return int(seq[:, inputs["input_ids"].shape[1] :].numel())

        return run

    arms = {
        "generate": backend_arm(plain),
        "generate_static": static_arm(policy.model),
        "decode": backend_arm(decode),
    }
    if compile_arm:
        import copy

        compiled = copy.deepcopy(policy.model).eval()
        compiled.forward = torch.compile(compiled.forward, dynamic=False)
        arms["generate_static_compile"] = static_arm(compiled)
    return arms


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile arm (slow to warm up)")
    args = parser.parse_args(argv)
    provenance = Provenance("benchmarks/perf_rollout.py", argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        policy, prompts, images = _batch(prepare_workdir(Path(tmp)))
        arms = make_arms(policy, args.compile)
        failed: dict[str, str] = {}
        warmup: dict[str, float] = {}
        for name, run in list(arms.items()):  # warm-up round (compile happens here)
            start = time.perf_counter()
            try:
                run(prompts, images, 0)
            except Exception as err:  # an option that does not work on this machine is recorded, not fatal
                failed[name] = f"{type(err).__name__}: {err}"[:300]
                traceback.print_exc()
                del arms[name]
            warmup[name] = time.perf_counter() - start
        names = list(arms)
        rounds = []
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            row: dict[str, Any] = {"order": order}
            for name in order:
                start = time.perf_counter()
                tokens = arms[name](prompts, images, 1 + r)
                row[name] = {"s": time.perf_counter() - start, "tokens": tokens}
            rounds.append(row)
            print(f"round {r + 1}: " + ", ".join(f"{n} {row[n]['s']:.3f}s" for n in names), flush=True)
    result = provenance.fields(args) | {"arms": names, "failed": failed, "warmup_s": warmup, "rounds": rounds}
    result["summary"] = summarise(rounds, names)
    print(save_result("rollout", result))
    return 0


def summarise(rounds: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        tps = [r[name]["tokens"] / r[name]["s"] for r in rounds]
        speedup = [r["generate"]["s"] / r[name]["s"] for r in rounds]
        out[name] = {
            "median_s": statistics.median(r[name]["s"] for r in rounds),
            "median_tokens_per_s": statistics.median(tps),
            "speedup_vs_generate_median": statistics.median(speedup),
            "speedup_min": min(speedup),
            "speedup_max": max(speedup),
        }
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
