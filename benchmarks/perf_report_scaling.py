"""The rollout (`perf_rollout.py`) and scaling (`perf_scaling.py`) sections of `results/perf.md`, and the
scaling PNG; `perf_report.write_report` calls the section functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROLLOUT_TARGET = 3.0  # rollout tokens/s over HF generate's (issue 18)


def _header(r: dict[str, Any]) -> list[str]:
    from perf_report import _run_header

    return _run_header(r)


def rollout_headline(r: dict[str, Any]) -> list[str]:
    s = r["summary"]
    best = max(s, key=lambda n: s[n]["speedup_vs_generate_median"])
    return [
        f"| rollout tokens/s, `{best}` / HF `generate` ({len(r['rounds'])} interleaved rounds) | "
        f"**{s[best]['speedup_vs_generate_median']:.2f}x** ({s[best]['median_tokens_per_s']:.0f} vs "
        f"{s['generate']['median_tokens_per_s']:.0f} tokens/s) | >= {ROLLOUT_TARGET:.0f}x |"
    ]


def section_rollout(r: dict[str, Any]) -> list[str]:
    s, names = r["summary"], r["arms"]
    lines = ["## Rollout samplers side by side (`perf_rollout.py`)", "", *_header(r)]
    lines += [
        "Same 8 prompts x G = 8, exactly 48 new tokens, temperature 1, top-k/top-p off, image ids "
        "suppressed; each round runs every arm once in a rotated order. Speed-up = HF `generate`'s "
        "time / the arm's time in the same round.",
        "",
        "| arm | median s per rollout | median tokens/s | speed-up vs `generate`: median (min, max) "
        "| warm-up s |",
        "|---|---|---|---|---|",
    ]
    for n in names:
        v = s[n]
        lines.append(
            f"| `{n}` | {v['median_s']:.3f} | {v['median_tokens_per_s']:.0f} | "
            f"{v['speedup_vs_generate_median']:.2f}x ({v['speedup_min']:.2f}, {v['speedup_max']:.2f}) | "
            f"{r['warmup_s'][n]:.1f} |"
        )
    for n, why in r.get("failed", {}).items():
        lines.append(f"| `{n}` | failed on this machine: {why} | - | - | {r['warmup_s'].get(n, 0):.1f} |")
    lines += ["", "Raw rounds (seconds per rollout):", "", "| round | order | " + " | ".join(names) + " |"]
    lines.append("|---|---|" + "---|" * len(names))
    for i, row in enumerate(r["rounds"], 1):
        cells = " | ".join(f"{row[n]['s']:.3f}" for n in names)
        lines.append(f"| {i} | {', '.join(row['order'])} | {cells} |")
    return [*lines, ""]


def section_scaling(r: dict[str, Any]) -> list[str]:
    lines = ["## Scaling with the work (`perf_scaling.py`)", "", *_header(r)]
    lines += [
        "One factor at a time around 8 problems x G = 8 x 48 tokens; each point a fresh process per trainer. "
        "`per token rel.` = (seconds / generated token) at the point over that at the sweep's first point: "
        "1.0 is linear growth, above 1 bends up. Plot: `perf_scaling.png`.",
        "",
        "| sweep | value | ours step s | TRL step s | ours/TRL | ours rollout s | ours update s "
        "| TRL generate s | ours RSS MB | TRL RSS MB | ours step per token rel. | TRL step per token rel. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    s = r["summary"]
    for key in s:
        factor, side = key.split("/")
        if side != "ours":
            continue
        ours, trl = s[key], s.get(f"{factor}/trl")
        for i, value in enumerate(ours["values"]):

            def cell(entry: dict | None, name: str, fmt: str = "{:.2f}", i: int = i) -> str:
                if entry is None or entry.get(name) is None or entry[name][i] is None:
                    return "-"
                return fmt.format(entry[name][i])

            ratio = f"{ours['step_s'][i] / trl['step_s'][i]:.2f}" if trl else "-"
            lines.append(
                f"| {factor} | {value} | {cell(ours, 'step_s')} | {cell(trl, 'step_s')} | {ratio} | "
                f"{cell(ours, 'rollout_s')} | {cell(ours, 'update_s')} | {cell(trl, 'rollout_s')} | "
                f"{cell(ours, 'peak_rss_mb', '{:.0f}')} | {cell(trl, 'peak_rss_mb', '{:.0f}')} | "
                f"{cell(ours, 'step_s_per_token_rel')} | {cell(trl, 'step_s_per_token_rel')} |"
            )
    return [*lines, ""]


def plot_scaling(r: dict[str, Any], path: Path) -> Path:
    """Step time (and ours' phases) and peak RSS against each factor, ours and TRL's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r["summary"]
    factors = list(dict.fromkeys(k.split("/")[0] for k in s))
    fig, axes = plt.subplots(2, len(factors), figsize=(4.5 * len(factors), 7), squeeze=False)
    for j, factor in enumerate(factors):
        top, bottom = axes[0][j], axes[1][j]
        for side, style in (("ours", "-o"), ("trl", "--s")):
            e = s.get(f"{factor}/{side}")
            if not e:
                continue
            top.plot(e["values"], e["step_s"], style, label=f"{side} step")
            if side == "ours" and all(v is not None for v in e["rollout_s"]):
                top.plot(e["values"], e["rollout_s"], ":^", label="ours rollout")
                top.plot(e["values"], e["update_s"], ":v", label="ours update")
            if side == "trl" and all(v is not None for v in e["rollout_s"]):
                top.plot(e["values"], e["rollout_s"], ":x", label="trl generate")
            bottom.plot(e["values"], e["peak_rss_mb"], style, label=side)
        top.set(xscale="log", yscale="log", title=factor, ylabel="seconds per step")
        bottom.set(xscale="log", xlabel=factor, ylabel="peak RSS MB")
        top.legend(fontsize=7)
        bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
