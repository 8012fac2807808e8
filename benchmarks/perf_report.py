"""Render `benchmarks/results/perf.md` from the raw results (`benchmarks/results/perf_*.json`).

    .venv/bin/python benchmarks/perf_report.py          # re-render without re-running anything

Every benchmark script calls `write_report` after saving its JSON, so perf.md always shows the newest raw
numbers of each benchmark; the hand-written reading of them lives in `results/perf_notes.md` and is
included verbatim at the end.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "perf.md"
README = Path(__file__).resolve().parent / "README.md"
MARKERS = ("<!-- perf-headline:start -->", "<!-- perf-headline:end -->")
NOTES = RESULTS / "perf_notes.md"
TARGETS = {"step": 0.4, "weighting": 0.20}  # issue 18 (were 0.7 and +35%)


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"perf_{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _run_header(r: dict[str, Any]) -> list[str]:
    m, v = r["machine"], r["versions"]
    return [
        f"Command: `{r['command']}`  ",
        f"Machine: {m['platform']}, {m['cpu_cores']} CPU cores, {m['device']}; Python {m['python']}, "
        + ", ".join(f"{k} {x}" for k, x in v.items())
        + f"; {r['settings'].get('threads', '?')} thread(s) per run.  ",
        f"Load average (1/5/15 min) at start {r['load_average_start']}, at end {r['load_average_end']}; "
        f"the 2 cores are shared with other jobs, so absolute times are noisy and ratios come from "
        f"interleaved runs. Duration {r['duration_s'] / 60:.1f} min.",
        "",
    ]


def _times(values: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in values)


def _ratio_line(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"


def headline(step: dict | None, weighting: dict | None, mfu: dict | None) -> list[str]:
    lines = ["| measure | result | target |", "|---|---|---|"]
    if step:
        s = step["summary"]
        lines += [
            f"| step time, ours / TRL GRPOTrainer, equal work ({s['step_pairs']} step pairs alternating in "
            f"{len(step['alternating'])} processes) | **{s['ratio_median']:.2f}x** "
            f"({s['ours_step_s_median']:.2f} s vs {s['trl_step_s_median']:.2f} s) | <= {TARGETS['step']}x |",
            f"| the same, {s['run_pairs']} interleaved process pairs | {s['run_ratio_median']:.2f}x "
            f"({s['ours_run_step_s_median']:.2f} s vs {s['trl_run_step_s_median']:.2f} s) | "
            f"<= {TARGETS['step']}x |",
            f"| peak RSS, ours / TRL | {s['rss_ratio_median']:.2f}x ({s['ours_rss_mb_median']:.0f} MB vs "
            f"{s['trl_rss_mb_median']:.0f} MB) | - |",
        ]
    if weighting:
        s = weighting["summary"]
        lines.append(
            f"| visual-dependency weighting overhead ({s['pairs']} interleaved step pairs) | "
            f"**{100 * s['overhead_median']:+.1f}%** ({s['weighted_step_s_median']:.2f} s vs "
            f"{s['unweighted_step_s_median']:.2f} s) | <= +{100 * TARGETS['weighting']:.0f}% |"
        )
    if mfu:
        for name, v in mfu["variants"].items():
            p = v["phases"]
            lines.append(
                f"| MFU {name} (peak {v['peak_gflops_median']:.0f} GFLOP/s): rollout / update / whole step | "
                f"{100 * p['rollout']['mfu']:.2f}% / {100 * p['policy_update']['mfu']:.2f}% / "
                f"{100 * v['step_mfu']:.2f}% | - |"
            )
    return [*lines, ""]


def section_step(r: dict[str, Any]) -> list[str]:
    title = "## Step time and peak RSS against TRL's GRPOTrainer (`perf_step.py`)"
    lines = [title, "", *_run_header(r)]
    s = r["summary"]
    lines += [
        f"**Alternating steps** (both trainers in one process, TRL step k then our step k; the first pair is "
        f"warm-up): ours / TRL {_ratio_line(_alternating_ratios(r))} over {s['step_pairs']} step pairs.",
        "",
        "Median phases per step: TRL "
        + ", ".join(
            f"{k.removeprefix('trl_')} {v:.3f} s" for k, v in s["phases_s_median"].items() if k[:3] == "trl"
        )
        + "; ours "
        + ", ".join(
            f"{k.removeprefix('ours_')} {v:.3f} s" for k, v in s["phases_s_median"].items() if k[:4] == "ours"
        )
        + " (`generate` is TRL's HF generate call; `forward_loss` its `compute_loss`, summed over the two "
        "micro-batches; ours `after_rollout` is `perf/update_time_s`: scoring, batch, fwd+bwd, optimizer).",
        "",
        "| process | pair | ours step s | TRL step s | ours/TRL |",
        "|---|---|---|---|---|",
    ]
    for k, run in enumerate(r["alternating"]):
        ours, trl = run["step_s"]["ours"], run["step_s"]["trl"]
        lines += [
            f"| {k + 1} | {i} | {ours[i]:.3f} | {trl[i]:.3f} | {ours[i] / trl[i]:.3f} |"
            for i in range(1, len(ours))
        ]
    ratios = [p["ours"]["step_s"] / p["trl"]["step_s"] for p in r["pairs"]]
    lines += [
        "",
        f"**Process pairs** (each run a fresh process, order AB, BA, ...; a run's step time is the median "
        f"of its "
        f"step intervals without the first and last): ours / TRL {_ratio_line(ratios)}. Peak RSS ours / TRL "
        f"median {s['rss_ratio_median']:.3f}.",
        "",
        "| pair | order | ours step s | TRL step s | ours/TRL | ours peak RSS MB | TRL peak RSS MB | "
        "ours step intervals s | TRL step intervals s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, (p, ratio) in enumerate(zip(r["pairs"], ratios, strict=True)):
        a, b = p["ours"], p["trl"]
        order = "ours, TRL" if i % 2 == 0 else "TRL, ours"
        lines.append(
            f"| {i + 1} | {order} | {a['step_s']:.3f} | {b['step_s']:.3f} | {ratio:.3f} | "
            f"{a['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} | {_times(a['intervals_s'])} | "
            f"{_times(b['intervals_s'])} |"
        )
    first = r["pairs"][0]
    lines += [
        "",
        "Equal-work check, per step of the first process pair: generated tokens ours "
        f"{_times(first['ours']['generated_tokens'])}, TRL {_times(first['trl']['generated_tokens'])}; "
        f"trained tokens ours {_times(first['ours']['trained_tokens'])}, TRL "
        f"{_times(first['trl']['trained_tokens'])}; gradient norms ours "
        f"{' '.join(f'{x:.2g}' for x in first['ours']['grad_norm'])}, TRL "
        f"{' '.join(f'{x:.2g}' for x in first['trl']['grad_norm'])}.",
        "",
    ]
    return lines


def _alternating_ratios(r: dict[str, Any]) -> list[float]:
    return [
        a / b
        for run in r["alternating"]
        for a, b in zip(run["step_s"]["ours"][1:], run["step_s"]["trl"][1:], strict=True)
    ]


def _weighting_pairs(r: dict[str, Any]) -> list[tuple[int, int, str, float, float]]:
    """(run, pair, first side, weighted s, unweighted s) of every timed step pair (warm-up pair left out)."""
    out = []
    for k, run in enumerate(r["runs"]):
        w, u = run["step_s"]["weighted"], run["step_s"]["unweighted"]
        out += [(k + 1, i, run["first_of_pair"][i], w[i], u[i]) for i in range(1, len(w))]
    return out


def section_weighting(r: dict[str, Any], before: dict | None) -> list[str]:
    lines = ["## Overhead of visual-dependency weighting (`perf_weighting.py`)", "", *_run_header(r)]
    s = r["summary"]
    pairs = _weighting_pairs(r)
    lines += [
        f"Overhead weighted / unweighted - 1 over {s['pairs']} step pairs in {len(r['runs'])} processes: "
        f"median **{100 * s['overhead_median']:+.1f}%** (min {100 * s['overhead_min']:+.1f}%, max "
        f"{100 * s['overhead_max']:+.1f}%); ratio of the median step times "
        f"{100 * s['overhead_of_medians']:+.1f}% ({s['weighted_step_s_median']:.3f} s vs "
        f"{s['unweighted_step_s_median']:.3f} s). Median phases: rollout "
        f"{s['weighted_rollout_s_median']:.3f} s "
        f"vs {s['unweighted_rollout_s_median']:.3f} s; everything after the rollout (`perf/update_time_s`: "
        f"score, experts, batch, no-grad passes, update) {s['weighted_update_s_median']:.3f} s vs "
        f"{s['unweighted_update_s_median']:.3f} s.",
        "",
        "| process | pair | first | weighted step s | unweighted step s | overhead |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {i} | {first} | {w:.3f} | {u:.3f} | {100 * (w / u - 1):+.1f}% |"
        for k, i, first, w, u in pairs
    ]
    if before:
        b = before["summary"]
        lines += [
            "",
            f"Before the hot-path fix: `{before['command']}` (load {before['load_average_start']} -> "
            f"{before['load_average_end']}): median **{100 * b['overhead_median']:+.1f}%** "
            f"over {b['pairs']} pairs "
            f"(min {100 * b['overhead_min']:+.1f}%, max {100 * b['overhead_max']:+.1f}%), median step times "
            f"{b['weighted_step_s_median']:.3f} s vs {b['unweighted_step_s_median']:.3f} s; per pair: "
            + ", ".join(f"{100 * (w / u - 1):+.1f}%" for _, _, _, w, u in _weighting_pairs(before))
            + ".",
        ]
    return [*lines, ""]


def section_mfu(r: dict[str, Any]) -> list[str]:
    lines = ["## Throughput and MFU (`perf_mfu.py`)", "", *_run_header(r)]
    a, b = r["matmul_peak_start"], r["matmul_peak_end"]
    sizes = ", ".join(f"{n}: {g:.1f}" for n, g in a["gflops_by_size"].items())
    m = r["model"]
    lines += [
        f"Measured fp32 matmul peak: {a['peak_gflops']:.1f} GFLOP/s at the start "
        f"(n x n `torch.mm`, n = {sizes}), "
        f"{b['peak_gflops']:.1f} GFLOP/s at the end. MFU uses the peak probed (2048 x 2048) just before "
        "each step: "
        + "; ".join(
            f"{name} median {v['peak_gflops_median']:.1f} (range {v['peak_gflops_range'][0]:.1f}-"
            f"{v['peak_gflops_range'][1]:.1f}) GFLOP/s"
            for name, v in r["variants"].items()
        )
        + ".  ",
        f"Model: {m['params_total']:,} parameters; transformer blocks {m['params_layers']:,}, LM head (tied) "
        f"{m['params_head']:,}, vision tower {m['params_vision']:,}; {m['layers']} layers, attention width "
        f"{m['attention_width']}.",
        "",
        "| variant | phase | s / step | model GFLOP / step | counted GFLOP (last step) | GFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in r["variants"].items():
        for phase, p in v["phases"].items():
            counted = "-" if p["counted_gflops_last_step"] is None else f"{p['counted_gflops_last_step']:.2f}"
            lines.append(
                f"| {name} | {phase} | {p['seconds_median']:.3f} | {p['model_gflops_per_step']:.2f} | "
                f"{counted} | {p['gflops_per_s']:.2f} | {100 * p['mfu']:.2f}% |"
            )
        lines.append(
            f"| {name} | whole step | {v['step_s_median']:.3f} | - | - | - | {100 * v['step_mfu']:.2f}% |"
        )
    lines += [
        "",
        "| variant | rollout tokens/s (`perf/rollout_tokens_per_s`) | trained tokens/s over the step "
        "(`perf/tokens_per_s`) | trained tokens/s over the update phase |",
        "|---|---|---|---|",
    ]
    for name, v in r["variants"].items():
        lines.append(
            f"| {name} | {v['rollout_tokens_per_s_median']:,.0f} | {v['tokens_per_s_median']:,.0f} | "
            f"{v['update_tokens_per_s']:,.0f} |"
        )
    return [*lines, ""]


def section_profiles(profiles: list[dict[str, Any]]) -> list[str]:
    lines = ["## Hot-path profile (`profile_step.py`)", ""]
    for p in profiles:
        lines.append(
            f"- `{p['label']}`: `{p['command']}`; load {p['load_average_start']} -> {p['load_average_end']}"
            + (f"; {p['note']}" if p.get("note") else "")
        )
    keys = sorted({k for p in profiles for k in p["phases_s"]}, key=lambda k: (k != "step", k))
    lines += [
        "",
        "Median inclusive wall time per step (ms); nested paths are inside their parent.",
        "",
        "| phase | " + " | ".join(p["label"] for p in profiles) + " |",
        "|---|" + "---|" * len(profiles),
    ]
    for k in keys:
        lines.append(
            f"| {k} | " + " | ".join(f"{1e3 * p['phases_s'].get(k, 0.0):.1f}" for p in profiles) + " |"
        )
    shares = []
    for p in profiles:
        ph = p["phases_s"]
        parts = ", ".join(
            f"{k} {100 * ph.get(k, 0.0) / ph['step']:.0f}%"
            for k in ("rollout", "prepare_batch", "policy_update")
        )
        shares.append(f"`{p['label']}` {parts}")
    lines += ["", "Share of the step (comparable across runs at different load): " + "; ".join(shares) + "."]
    for p in profiles[:1] + profiles[-1:] if len(profiles) > 1 else profiles:
        lines += [
            "",
            f"Top torch ops by self CPU time, `{p['label']}` (one step under torch.profiler):",
            "",
            "| op | calls | self ms | share |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {o['op']} | {o['calls']} | {o['self_ms']:.1f} | {100 * o['share']:.1f}% |"
            for o in p["top_ops"]
        ]
    return [*lines, ""]


def write_report() -> Path:
    from perf_report_scaling import rollout_headline, section_rollout, section_scaling

    step, weighting, mfu = _load("step"), _load("weighting"), _load("mfu")
    rollout, scaling = _load("rollout"), _load("scaling")
    table = headline(step, weighting, mfu)
    if rollout:
        table[-1:-1] = rollout_headline(rollout)
    profiles = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("perf_profile_*.json"))]
    profiles.sort(key=lambda p: p["label"])
    lines = [
        "# RL step performance",
        "",
        "Generated by `benchmarks/perf_report.py` from `benchmarks/results/perf_*.json` (written by "
        "`perf_step.py`, `perf_rollout.py`, `perf_weighting.py`, `perf_scaling.py`, `perf_mfu.py`, "
        "`profile_step.py`); see `benchmarks/README.md`. "
        "All numbers were measured on the machine named in each section (CPU only).",
        "",
        "## Headline",
        "",
        *table,
    ]
    if step:
        lines += section_step(step)
    if rollout:
        lines += section_rollout(rollout)
    if weighting:
        lines += section_weighting(weighting, _load("weighting_before"))
    if scaling:
        lines += section_scaling(scaling)
    if mfu:
        lines += section_mfu(mfu)
    if profiles:
        lines += section_profiles(profiles)
    if NOTES.is_file():
        lines += [NOTES.read_text().strip(), ""]
    OUT.write_text("\n".join(lines))
    _update_readme(table)
    return OUT


def _update_readme(table: list[str]) -> None:
    """Put the headline table between the README's markers (the README's other text is left alone)."""
    if not README.is_file():
        return
    text = README.read_text()
    start, end = MARKERS
    if start not in text or end not in text:
        return
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    README.write_text(before + start + "\n" + "\n".join(table) + end + after)


if __name__ == "__main__":
    print(write_report())
    sys.exit(0)
