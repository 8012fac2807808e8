"""The report of `benchmarks/reproduce.py`: table (mean ± std over seeds and the raw per-seed numbers),
paired comparisons against TGRL full, learning curves (PNG), machine, versions, wall time, and the
hand-written reading (`benchmarks/configs/reproduction_reading.md`, included verbatim when present)."""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parent / "configs"
READING = (
    CONFIGS / "reproduction_reading.md"
)  # table v3's (recipe repro-tiny-cpu); others: <recipe>_reading.md
METRICS = (("accuracy", "accuracy"), ("grounding", "grounding"), ("format_rate", "format rate"))
REFERENCE = "tgrl"


def load_runs(runs_dir: Path) -> dict[tuple[str, int], dict[str, Any]]:
    runs = {}
    for path in sorted(runs_dir.glob("*-seed*.json")):
        payload = json.loads(path.read_text())
        runs[(payload["arm"], payload["seed"])] = payload
    return runs


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def chance_baselines(work: Path) -> dict[str, float]:
    """Accuracy without looking at the image: the train split's most frequent answer per question type
    (blind prior), and uniform guessing among the choices (integer questions count 0)."""
    train, test = work / "data" / "train" / "records.jsonl", work / "data" / "test" / "records.jsonl"
    if not (train.exists() and test.exists()):
        return {}
    rows = {
        s: [json.loads(x) for x in p.read_text().splitlines() if x] for s, p in (("tr", train), ("te", test))
    }

    def kind(p: dict[str, Any]) -> str:
        return (
            json.dumps(p["meta"].get("task", {}), sort_keys=True)
            if "k" in p["meta"].get("task", {})
            else (p["meta"].get("task", {}).get("op", "?"))
        )

    answers: dict[str, Counter] = defaultdict(Counter)
    for p in rows["tr"]:
        answers[kind(p)][p["answer"]] += 1
    hits = [
        bool(answers[kind(p)]) and answers[kind(p)].most_common(1)[0][0] == p["answer"] for p in rows["te"]
    ]
    uniform = [1 / len(p["choices"]) if p.get("choices") else 0.0 for p in rows["te"]]
    return {"blind_prior": statistics.mean(hits), "uniform_choice": statistics.mean(uniform)}


def kept_chance(work: Path, runs_dir: Path) -> dict[str, float]:
    """`chance_baselines` from the work directory's data, kept beside the runs (`chance.json`) so that a
    report rewritten without the work directory still has them."""
    kept = runs_dir / "chance.json"
    chance = chance_baselines(work)
    if chance:
        runs_dir.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps(chance, indent=1) + "\n")
    elif kept.exists():
        chance = json.loads(kept.read_text())
    return chance


# --------------------------------------------------------------------------------------------- plots
STAT_KEYS = (
    ("expert_share", "expert tokens / all trained tokens"),
    ("expert/grad_weight_mean", "expert-token gradient factor (shaping)"),
    ("expert/advantage_mean", "expert advantage"),
    ("expert/prob_mean", "expert-token p"),
    ("weights/mean", "token weight mean"),
    ("weights/clip_frac", "weights clipped"),
    ("reward/accuracy", "on-policy accuracy (last 50 updates)"),
)


def rl_update_stats(stage_dirs: list[Path]) -> dict[str, float]:
    """One run's RL stages (their `metrics.jsonl`; SFT stages skipped), each STAT_KEYS value averaged over
    the updates (on-policy accuracy over the last 50): how much of each update the expert tokens carry, and
    what the token weights did. Stored in the run's JSON, so the report does not need the work directory."""
    rows = []
    for stage in stage_dirs:
        metrics = stage / "metrics.jsonl"
        if stage.name.endswith("-sft") or not metrics.exists():
            continue
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        rows += [r for r in lines if r.get("step", 0) > 0]
    for r in rows:
        total = r.get("tokens/expert", 0.0) + r.get("tokens/policy", 0.0)
        r["expert_share"] = r.get("tokens/expert", 0.0) / total if total else 0.0
    stats = {}
    for key, _ in STAT_KEYS:
        values = [r[key] for r in (rows[-50:] if key == "reward/accuracy" else rows) if key in r]
        if values:
            stats[key] = statistics.mean(values)
    return stats


def train_stats(runs: dict, order: list[str]) -> dict[str, dict[str, float]]:
    """Per arm, the runs' `rl_updates` averaged over seeds (arms without RL updates are left out)."""
    per_arm: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (arm, _), run in sorted(runs.items()):
        for key, value in run.get("rl_updates", {}).items():
            per_arm[arm][key].append(value)
    return {a: {k: statistics.mean(v) for k, v in per_arm[a].items()} for a in order if a in per_arm}


def stats_table(stats: dict[str, dict[str, float]], arms: dict) -> list[str]:
    lines = ["| arm | " + " | ".join(t for _, t in STAT_KEYS) + " |", "|---|" + "---|" * len(STAT_KEYS)]
    for name, row in stats.items():
        no_experts, no_weights = not row.get("expert_share"), not row.get("weights/mean")
        cells = [
            "-"
            if k not in row
            or (no_experts and k.startswith("expert") and k != "expert_share")
            or (no_weights and k.startswith("weights/"))
            else f"{row[k]:.3f}"
            for k, _ in STAT_KEYS
        ]
        lines.append(f"| {arms[name].title} | " + " | ".join(cells) + " |")
    return lines


def plot_curves(runs: dict, arms: dict, order: list[str], chance: dict[str, float], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(order)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in order:
        seeds = [r for (a, _), r in sorted(runs.items()) if a == name and len(r["curve"]) > 1]
        if not seeds:
            continue
        steps = [p["step"] for p in seeds[0]["curve"]]
        for ax, key in zip(axes, ("accuracy", "grounding"), strict=True):
            values = [[p.get(key) or 0.0 for p in r["curve"]] for r in seeds if len(r["curve"]) == len(steps)]
            mean = [statistics.mean(v) for v in zip(*values, strict=True)]
            ax.plot(
                steps,
                mean,
                marker="o",
                ms=3,
                color=colors[name],
                label=f"{arms[name].title} (n={len(values)})",
            )
            ax.fill_between(
                steps,
                [min(v) for v in zip(*values, strict=True)],
                [max(v) for v in zip(*values, strict=True)],
                alpha=0.12,
            )
    for ax, key in zip(axes, ("held-out accuracy", "held-out grounding (true / stated facts)"), strict=True):
        ax.set_xlabel("optimizer updates (after the warm start)")
        ax.set_ylabel(key)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    if "blind_prior" in chance:
        axes[0].axhline(chance["blind_prior"], color="k", ls="--", lw=1, label="blind prior (no image)")
    if axes[0].get_legend_handles_labels()[0]:  # a quick run may have no non-zero series
        axes[0].legend(fontsize=7)
    fig.suptitle("Held-out learning curves (mean over seeds; band = min..max)")
    fig.tight_layout()
    paths.append(out / "reproduction_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in order:
        seeds = [r for (a, _), r in sorted(runs.items()) if a == name and r["train"]]
        for ax, key in zip(axes, ("reward/accuracy", "expert/prob_mean"), strict=True):
            series = _mean_series(seeds, key)
            if any(v for _, v in series):  # grpo logs expert/prob_mean 0: no experts
                ax.plot(*zip(*series, strict=True), color=colors[name], label=arms[name].title, lw=1.2)
    axes[0].set_ylabel("on-policy rollout accuracy (train, 10-step mean)")
    axes[1].set_ylabel("mean probability of expert tokens (train)")
    for ax in axes:
        ax.set_xlabel("optimizer updates")
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:  # a quick run may have no non-zero series
        axes[0].legend(fontsize=7)
    fig.suptitle("Training curves from the trainer's metrics (mean over seeds)")
    fig.tight_layout()
    paths.append(out / "reproduction_train.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _mean_series(seeds: list[dict], key: str, window: int = 10) -> list[tuple[int, float]]:
    per_step: dict[int, list[float]] = defaultdict(list)
    for run in seeds:
        for row in run["train"]:
            if key in row:
                per_step[row["step"]].append(row[key])
    steps = sorted(per_step)
    means = [statistics.mean(per_step[s]) for s in steps]
    return [(s, statistics.mean(means[max(0, i - window + 1) : i + 1])) for i, s in enumerate(steps)]


# ------------------------------------------------------------------------------------------ markdown
def value(run: dict[str, Any], split: str, key: str, sampled: bool = False) -> float | None:
    """A final metric of one run: greedy on `split` (test / ood / stress), or avg@k with `sampled`."""
    final = run["final"]
    source = final.get("sampled", {}) if sampled else final.get("splits", {"test": final})
    return (source.get(split) or {}).get(key)


# (column title, split, metric, sampled)
SPLIT_COLUMNS = (
    ("ID acc", "test", "accuracy", False),
    ("OOD acc", "ood", "accuracy", False),
    ("stress acc", "stress", "accuracy", False),
    ("ID grounding", "test", "grounding", False),
    ("OOD grounding", "ood", "grounding", False),
    ("ID evidence use", "test", "evidence_use", False),
    ("OOD evidence use", "ood", "evidence_use", False),
    ("ID avg@k (train T)", "test", "accuracy", True),
    ("OOD avg@k (train T)", "ood", "accuracy", True),
)


def split_columns(runs: dict) -> list[tuple[str, str, str, bool]]:
    """The SPLIT_COLUMNS some run has a value for (a v3 run has only the test split, greedy)."""
    return [c for c in SPLIT_COLUMNS if any(value(r, c[1], c[2], c[3]) is not None for r in runs.values())]


def split_table(runs: dict, arms: dict, order: list[str]) -> list[str]:
    cols = split_columns(runs)
    lines = ["| arm | seeds | " + " | ".join(c[0] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name in order:
        mine = [r for (a, _), r in sorted(runs.items()) if a == name]
        cells = [mean_std([v for r in mine if (v := value(r, *c[1:])) is not None]) for c in cols]
        lines.append(f"| {arms[name].title} | {len(mine)} | " + " | ".join(cells) + " |")
    return lines


def split_per_seed(runs: dict, arms: dict, order: list[str]) -> list[str]:
    cols = split_columns(runs)
    lines = ["| arm | seed | " + " | ".join(c[0] for c in cols) + " | facts stated | updates | wall s |",
             "|---|---|" + "---|" * (len(cols) + 3)]  # fmt: skip
    for name in order:
        for (a, seed), r in sorted(runs.items()):
            if a == name:
                cells = [f"{v:.3f}" if (v := value(r, *c[1:])) is not None else "-" for c in cols]
                stated = r["final"].get("facts_stated_mean") or 0.0
                lines.append(f"| {arms[name].title} | {seed} | " + " | ".join(cells)
                             + f" | {stated:.2f} | {r['updates']} | {r['wall_s']:.0f} |")  # fmt: skip
    return lines


def paired(runs: dict, arms: dict, order: list[str], ref: str) -> list[str]:
    """`ref` minus each arm, paired by seed, on every split column: mean (wins / seeds)."""
    cols = split_columns(runs)
    lines = [f"| {arms[ref].title} minus | seeds | " + " | ".join(c[0] for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]  # fmt: skip
    for name in order:
        seeds = sorted(s for (a, s) in runs if a == name and (ref, s) in runs)
        if name == ref or not seeds:
            continue
        cells = []
        for c in cols:
            pairs = [(value(runs[(ref, s)], *c[1:]), value(runs[(name, s)], *c[1:])) for s in seeds]
            deltas = [x - y for x, y in pairs if x is not None and y is not None]
            wins = sum(d > 0 for d in deltas)
            cells.append(f"{statistics.mean(deltas):+.3f} ({wins}/{len(deltas)})" if deltas else "-")
        lines.append(f"| {arms[name].title} | {len(seeds)} | " + " | ".join(cells) + " |")
    return lines


def split_protocol(x: Any, n_train: int) -> list[str]:
    """The protocol line on the v4 splits (none for table v3's data)."""
    if not (x.n_warm or x.n_ood or x.n_stress):
        return []
    return [
        f"- splits: of the train problems {x.n_warm} for the warm start (warm/, own experts), the other "
        f"{n_train - x.n_warm} for the arms (rl/); {x.n_ood} out-of-distribution problems (questions naming "
        f"{x.ood_color}, which no training question names; 1..{x.ood_extra_objects} more shapes or bars than "
        f"training scenes); {x.n_stress} hard-level problems (stress); all splits disjoint"
    ]


def gate_lines(runs_dir: Path) -> list[str]:
    path = runs_dir / "start_gate.json"
    if not path.exists():
        return []
    gate = json.loads(path.read_text())
    accuracy = ", ".join(f"seed {s}: {a:.3f}" for s, a in gate["start_accuracy"].items() if a is not None)
    floor = gate["min_accuracy"]
    dropped = gate["dropped"]
    return [
        "",
        f"Start models (greedy in-distribution test accuracy after the warm start): {accuracy}. "
        + (f"Gate: >= {floor}; " if floor is not None else "No gate; ")
        + (
            f"**dropped seed(s) {dropped}** (below the gate, no arm run on them)."
            if dropped
            else "no seed dropped."
        ),
    ]


def results_table(runs: dict, arms: dict, order: list[str]) -> list[str]:
    lines = [
        "| arm | seeds | accuracy | grounding | format rate | facts stated / response |",
        "|---|---|---|---|---|---|",
    ]
    for name in order:
        finals = [r["final"] for (a, _), r in sorted(runs.items()) if a == name]
        if not finals:
            lines.append(f"| {arms[name].title} | 0 | not run | | | |")
            continue
        cells = [mean_std([f.get(k) or 0.0 for f in finals]) for k, _ in METRICS]
        cells.append(mean_std([f.get("facts_stated_mean") or 0.0 for f in finals]))
        lines.append(f"| {arms[name].title} | {len(finals)} | " + " | ".join(cells) + " |")
    return lines


def per_seed_table(runs: dict, arms: dict, order: list[str]) -> list[str]:
    lines = [
        "| arm | seed | accuracy | grounding | format rate | facts stated | updates | wall s "
        "| library revision |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in order:
        for (a, seed), r in sorted(runs.items()):
            if a != name:
                continue
            f = r["final"]
            lines.append(
                f"| {arms[name].title} | {seed} | {f.get('accuracy', 0):.3f} | "
                f"{f.get('grounding') or 0:.3f} | "
                f"{f.get('format_rate', 0):.3f} | {f.get('facts_stated_mean') or 0:.2f} | {r['updates']} | "
                f"{r['wall_s']:.0f} | {r.get('revision', 'not recorded')} |"
            )
    return lines


def family_table(runs: dict, arms: dict, order: list[str]) -> list[str]:
    families = sorted({g for r in runs.values() for g in r["final"].get("families", {})})
    lines = ["| arm | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    for name in order:
        finals = [r["final"] for (a, _), r in sorted(runs.items()) if a == name]
        if finals:
            cells = [f"{statistics.mean(f['families'].get(g, 0.0) for f in finals):.3f}" for g in families]
            lines.append(f"| {arms[name].title} | " + " | ".join(cells) + " |")
    return lines


def comparisons(runs: dict, arms: dict, order: list[str], ref: str, minus: bool) -> list[str]:
    """Paired by seed (same start model): `ref` minus each arm (minus=True), or each arm minus `ref`."""
    title = arms[ref].title
    head = f"{title} minus" if minus else f"arm minus {title}"
    lines = [
        f"| {head} | seeds | Δ accuracy (mean) | per seed | higher in | Δ grounding (mean) |",
        "|---|---|---|---|---|---|",
    ]

    def delta(name: str, s: int, key: str) -> float:
        a, b = (runs[(ref, s)], runs[(name, s)]) if minus else (runs[(name, s)], runs[(ref, s)])
        return (a["final"].get(key) or 0.0) - (b["final"].get(key) or 0.0)

    for name in order:
        seeds = sorted(s for (a, s) in runs if a == name and (ref, s) in runs)
        if name == ref or not seeds:
            continue
        acc = [delta(name, s, "accuracy") for s in seeds]
        grd = [delta(name, s, "grounding") for s in seeds]
        wins = sum(d > 0 for d in acc)
        lines.append(
            f"| {arms[name].title} | {len(seeds)} | {statistics.mean(acc):+.3f} | "
            f"{', '.join(f'{d:+.3f}' for d in acc)} | {wins}/{len(seeds)} seeds | "
            f"{statistics.mean(grd):+.3f} |"
        )
    return lines


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


def write_report(
    recipe: Any, runs_dir: Path, results: Path, name: str, machine: dict, arms: dict, work: Path
) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    runs = {k: v for k, v in load_runs(runs_dir).items() if v.get("fingerprint") == recipe.fingerprint}
    order = [a for a in recipe.repro.arms if a in arms]
    expected = [(a, s) for s in recipe.repro.seeds for a in order]
    missing = [k for k in expected if k not in runs]
    chance = kept_chance(work, runs_dir)
    plots = plot_curves(runs, arms, order, chance, results)
    invocations = []
    if (runs_dir / "invocations.jsonl").exists():
        invocations = [json.loads(x) for x in (runs_dir / "invocations.jsonl").read_text().splitlines() if x]
    start = next((r for (a, _), r in sorted(runs.items()) if a == "untrained"), None)
    stats = train_stats(runs, order)
    summary = {
        "recipe": recipe.path.name,
        "fingerprint": recipe.fingerprint,
        "complete": not missing,
        "missing": missing,
        "machine": machine,
        "chance": chance,
        "invocations": invocations,
        "train_stats": stats,
        "arms": {
            n: {k: [r["final"].get(k) for (a, _), r in sorted(runs.items()) if a == n] for k, _ in METRICS}
            | {"seeds": [s for (a, s) in sorted(runs) if a == n]}
            | {
                f"{split}{'/sampled' if smp else ''}/{key}": [
                    value(r, split, key, smp) for (a, _), r in sorted(runs.items()) if a == n
                ]
                for _, split, key, smp in split_columns(runs)
            }
            for n in order
        },
        "start_gate": json.loads(g.read_text()) if (g := runs_dir / "start_gate.json").exists() else None,
    }
    (results / "reproduction.json").write_text(json.dumps(summary, indent=1) + "\n")
    r = recipe.repro
    t, d = recipe.pipeline.train, recipe.pipeline.data
    warm = (
        f"an SFT warm start of {r.warm_start.steps} updates x "
        f"{r.warm_start.problems_per_step or t.problems_per_step} "
        "problems on the filtered experts (per seed, shared by all arms, not counted in the budget)"
        if r.warm_start
        else "the model as initialised (no warm start)"
    )
    sft_text = (
        f"an SFT update trains on {t.problems_per_step * t.group_size} expert trajectories (one each for "
        f"{t.problems_per_step} x G problems: as many sequences as an RL update)"
        if getattr(r, "sft_sequences", "problems") == "group"
        else "an SFT update trains on one expert trajectory for each of the same number of problems"
    )
    wall = sum(i["wall_s"] for i in invocations)
    runs_text = ", ".join(
        f"{i['wall_s'] / 60:.1f} min, jobs {i['jobs']}"
        + (f", load average {i['load'][0]:.1f} at start / {i['load'][1]:.1f} at end" if "load" in i else "")
        for i in invocations
    )
    warm_times = [
        f"seed {sd}: {(info := json.loads(f.read_text())).get('warm_start_s', 0):.0f} s "
        f"(library {info.get('revision', 'not recorded')})"
        for sd in recipe.repro.seeds
        if (f := work / f"seed{sd}" / "start.json").exists()
    ]
    warm_text = ", ".join(warm_times) or "none"
    commands = list(dict.fromkeys(i["command"] for i in invocations)) or ["(no training invocation recorded)"]
    reading = CONFIGS / f"{recipe.path.stem}_reading.md"
    reading = READING if recipe.path.stem == "repro-tiny-cpu" else reading
    status = "complete" if not missing else f"PARTIAL: {len(expected) - len(missing)} of {len(expected)} runs"
    out = [
        f"# Reproduction: TGRL vs baselines and ablations ({status})",
        "",
        "Generated by `benchmarks/reproduce.py` (do not edit by hand; the reading comes from "
        f"`{_shown(reading)}`).",
        "",
        "## Command, machine, wall time",
        "",
        "```",
        *commands,
        "```",
        "",
        f"- machine: {machine['cpu']}; GPU: {machine['gpu']}; {machine['platform']}",
        f"- versions: python {machine['python']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}",
        f"- wall time: {wall / 60:.1f} min over {len(invocations)} invocation(s) "
        f"({runs_text}; 1-minute load averages against {os.cpu_count()} cores: "
        "above the core count the cores were shared with other work, and times are upper bounds)",
        f"- warm starts (per seed, before the arms; inside the wall time above unless they were reused from "
        f"an earlier invocation): {warm_text}",
        f"- recipe: `{_shown(recipe.path)}` (fingerprint {recipe.fingerprint})",
    ]
    if missing:
        out += [
            "",
            f"**Partial**: missing runs {missing}. The script is resumable: rerun the same command to finish "
            "them (finished runs are skipped, an interrupted run continues from its newest checkpoint).",
        ]
    out += [
        "",
        "## Protocol",
        "",
        f"- data: synthetic benchmark, {d.n_train} train problems, {d.n_test} held-out test problems (unseen "
        f"images), difficulties {d.difficulties}, families {d.families or 'all four'}, "
        f"{d.image_size} px images",
        *split_protocol(recipe.repro.splits, d.n_train),
        f"- experts: the oracle with fault_rate {recipe.pipeline.generate.fault_rate} "
        f"({recipe.pipeline.generate.samples_per_problem} per problem) = *raw*; the recipe's "
        f"{len(recipe.pipeline.filter.filters)} filters applied to them = *filtered*",
        f"- model: `{r.model}` (tiny = the 0.68M-parameter Qwen2.5-VL-shaped model, initialised with the "
        "seed); "
        f"every arm of a seed starts from {warm}",
        f"- budget: {r.steps} optimizer updates per trained arm (one update per step: minibatch = whole "
        "batch); "
        f"{t.problems_per_step} problems per update; RL arms sample G={t.group_size} at temperature "
        f"{t.sampling.temperature}, max {t.sampling.max_new_tokens} new tokens; {sft_text}; lr {t.lr}, "
        f"{t.loss.aggregation} loss, clip {t.loss.clip}, shaping gamma "
        f"{t.loss.shaping_gamma}, reward = correct + {t.format_reward} x format; token weights (arms that "
        f"keep them) {t.weighting.kind} on {t.weighting.apply_to} tokens, {t.weighting.normalise}-"
        f"normalised within [{t.weighting.w_min}, {t.weighting.w_max}]",
        "- evaluation: `tgrl_lib.evaluation.run.evaluate`, greedy, max "
        f"{recipe.pipeline.eval.sampling.max_new_tokens} new "
        f"tokens, on the test split, after every {r.curve_every} updates and at the end",
        f"- seeds {r.seeds}: the seed sets the model init (and so the warm start), the rollout sampling and "
        "the data order; the dataset and the expert trajectories are the same for all seeds",
        "",
        "## Arms",
        "",
        "| arm | stages (algorithm x share of budget, experts) | differs from TGRL full by |",
        "|---|---|---|",
    ]
    for n in order:
        a = arms[n]
        stages = (
            "; ".join(f"{s.algorithm} x {s.share:g} ({s.experts or 'no experts'})" for s in a.stages) or "-"
        )
        out.append(f"| {a.title} (`{n}`) | {stages} | {a.switches} |")
    out += ["", "## Results (held-out test split, final model)", "", "mean ± sample std over seeds.", ""]
    out += results_table(runs, arms, order)
    if any("splits" in r["final"] for r in runs.values()):
        ood = recipe.repro.splits.ood_color
        out += ["", "### In distribution, out of distribution, stress (final model)", "",
                f"ID = the test split (same question types as training); OOD = questions naming a colour no "
                f"training question names ({ood}) and scenes with more shapes than training scenes; stress "
                "= the hard level. Grounding = true / stated facts; evidence use = answers that follow from "
                "the response's own stated facts (over the responses that state enough). avg@k: k samples "
                "at the training temperature. mean ± sample std.", ""]  # fmt: skip
        out += split_table(runs, arms, order)
        out += gate_lines(runs_dir)
        out += ["", "#### Raw per-seed numbers", ""] + split_per_seed(runs, arms, order)
        out += ["", f"#### {arms[REFERENCE].title} minus each arm, paired by seed (mean, wins/seeds)", ""]
        out += paired(runs, arms, order, REFERENCE) if REFERENCE in order else ["(TGRL full not in the arms)"]
    if chance:
        out += [
            "",
            f"Reference points without the image: the train split's most frequent answer per question "
            f"type scores **{chance['blind_prior']:.3f}** on the test split (blind prior); uniform guessing "
            f"among the choices scores {chance['uniform_choice']:.3f} (integer questions count 0).",
        ]
    if start is not None and start.get("random_init"):
        ri = start["random_init"]
        out += [
            "",
            f"The randomly initialised model (before the warm start), seed {start['seed']}: accuracy "
            f"{ri.get('accuracy', 0):.3f}, format rate {ri.get('format_rate', 0):.3f}, grounding "
            f"{ri.get('grounding') or 0:.3f}.",
        ]
    out += ["", "### Raw per-seed numbers", ""] + per_seed_table(runs, arms, order)
    out += ["", "### Accuracy per task family (mean over seeds)", ""] + family_table(runs, arms, order)
    out += ["", "### Each arm against its start model (paired by seed)", ""]
    out += comparisons(runs, arms, order, "untrained", minus=False)
    out += ["", "### TGRL full against each arm (paired by seed)", ""]
    out += comparisons(runs, arms, order, REFERENCE, minus=True)
    if stats:
        out += [
            "",
            "### What the RL updates trained on (trainer metrics, mean over updates, then over seeds)",
            "",
            "The expert-token gradient factor is d(shaped ratio)/d(log p) = gamma p / (p + gamma)^2 "
            "averaged over expert tokens (1 would be plain log-likelihood, as in SFT); token weights are "
            "those on the tokens they apply to. Per-run values are each run JSON's `rl_updates`; "
            "per-update values are in the work directory's `seedN/ARM/stage*/metrics.jsonl`.",
            "",
        ]
        out += stats_table(stats, arms)
    out += ["", "## Learning curves", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    out += [
        "",
        "Raw results: `reproduction.json` (summary) and one JSON per arm and seed in "
        f"`{runs_dir.name}/` (final metrics, held-out curve, the trainer's per-step metrics).",
    ]
    out += ["", "## Reading", ""]
    out += [reading.read_text().strip()] if reading.exists() else ["(no reading written yet)"]
    path = results / "reproduction.md"
    path.write_text("\n".join(out) + "\n")
    return path
