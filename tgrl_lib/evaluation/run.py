"""Benchmark evaluation: generate, score with the training reward's own scorer, aggregate, report.

The scorer is `tgrl_lib.scoring.rewards` (the same one the RL reward uses, as in nanochat), so a
benchmark number and a training reward can never disagree about what counts as correct. Metrics per
benchmark and per task family (`meta["family"]`, or `meta["category"]` for imported benchmarks):

- `accuracy`: avg@k, the mean correctness over all k samples of all problems (greedy k=1 by default).
- `pass@k`: the unbiased estimator 1 - C(n-c, k)/C(n, k) with n = k samples (HumanEval's), i.e. any correct.
- `format_rate`: share of responses with exactly `<think>...</think><answer>...</answer>`.
- `length_mean`: mean response length in tokens (policy tokenizer; words when no token ids are known).
- `grounding`: for problems with `facts`, true stated facts / all stated facts, pooled over responses;
  `facts_stated_mean`: stated facts per response (a model that states nothing is not "grounded").
- `evidence_use`: for synthetic problems (facts and a task), the share of responses whose answer follows
  from the facts they themselves state (`tgrl_lib.scoring.evidence`), over the responses that state enough
  to apply the task's rule; `evidence_derivable`: that share of the responses (ours, not the anchors').
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tgrl_lib.data.schema import Problem
from tgrl_lib.errors import TgrlError


@dataclass
class SampleScore:
    correct: bool
    formatted: bool
    length: int
    stated: int = 0
    true_facts: int = 0
    evidence: bool | None = None  # answer follows from the stated facts; None: not derivable / no task
    text: str = ""  # the response, kept in samples_<benchmark>.jsonl


@dataclass
class ProblemScore:
    problem_id: str
    group: str
    samples: list[SampleScore] = field(default_factory=list)
    has_facts: bool = False
    has_task: bool = False  # a machine-readable task (synthetic): evidence use can be judged


def problem_group(problem: Problem) -> str:
    return str(problem.meta.get("family") or problem.meta.get("category") or "all")


def score_problem(problem: Problem, texts: list[str], lengths: list[int] | None = None) -> ProblemScore:
    """Score the k responses to one problem."""
    from tgrl_lib.scoring.evidence import evidence_use
    from tgrl_lib.scoring.grounding import check_claims, extract_claims
    from tgrl_lib.scoring.rewards import has_valid_format, verify

    task = (problem.meta or {}).get("task")
    has_task = bool(problem.facts) and isinstance(task, dict) and "op" in task
    score = ProblemScore(problem.id, problem_group(problem), has_facts=bool(problem.facts), has_task=has_task)
    for i, text in enumerate(texts):
        length = lengths[i] if lengths is not None else len(text.split())
        sample = SampleScore(
            correct=verify(text, problem), formatted=has_valid_format(text), length=length, text=text
        )
        if problem.facts:
            result = check_claims(extract_claims(text), problem.facts)
            sample.stated, sample.true_facts = result.stated, result.true
            sample.evidence = evidence_use(text, problem).follows if has_task else None
        score.samples.append(sample)
    return score


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def aggregate(scores: list[ProblemScore], k: int) -> dict[str, float]:
    """Metrics over a list of problem scores (see module docstring)."""
    samples = [s for p in scores for s in p.samples]
    if not samples:
        return {"count": 0.0}
    grounded = [s for p in scores if p.has_facts for s in p.samples]
    stated = sum(s.stated for s in grounded)
    metrics = {
        "count": float(len(scores)),
        "accuracy": sum(s.correct for s in samples) / len(samples),
        f"pass@{k}": sum(pass_at_k(len(p.samples), sum(s.correct for s in p.samples), k) for p in scores)
        / len(scores),
        "format_rate": sum(s.formatted for s in samples) / len(samples),
        "length_mean": sum(s.length for s in samples) / len(samples),
    }
    if grounded:
        metrics["grounding"] = sum(s.true_facts for s in grounded) / stated if stated else 0.0
        metrics["facts_stated_mean"] = stated / len(grounded)
    tasked = [s for p in scores if p.has_task for s in p.samples]
    if tasked:  # problems with facts and a machine-readable task (synthetic)
        derivable = [s.evidence for s in tasked if s.evidence is not None]
        metrics["evidence_use"] = sum(derivable) / len(derivable) if derivable else 0.0
        metrics["evidence_derivable"] = len(derivable) / len(tasked)
    return metrics


def summarize(scores: list[ProblemScore], k: int) -> dict[str, Any]:
    """`{"overall": metrics, "groups": {family: metrics}}` for one benchmark."""
    groups: dict[str, list[ProblemScore]] = defaultdict(list)
    for score in scores:
        groups[score.group].append(score)
    return {
        "overall": aggregate(scores, k),
        "groups": {name: aggregate(items, k) for name, items in sorted(groups.items())},
    }


# ------------------------------------------------------------------------------------------ reports
def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per benchmark and per family; columns are the metrics present (evidence use only where
    some benchmark has synthetic tasks)."""
    evidence = [
        m for m in ("evidence_use", "evidence_derivable") if any(m in r["overall"] for r in results.values())
    ]
    columns = (
        ["count", "accuracy"]
        + sorted({m for r in results.values() for m in r["overall"] if m.startswith("pass@")})
        + ["format_rate", "length_mean", "grounding", "facts_stated_mean", *evidence]
    )
    lines = ["| benchmark | group | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for bench, result in results.items():
        rows = [("(overall)", result["overall"])] + list(result["groups"].items())
        for group, metrics in rows:
            cells = [_cell(metrics.get(c), integer=c == "count") for c in columns]
            lines.append(f"| {bench} | {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float | None, *, integer: bool = False) -> str:
    if value is None:
        return "-"
    return f"{int(value)}" if integer or (float(value).is_integer() and value > 1) else f"{value:.3f}"


def write_plots(results: dict[str, dict[str, Any]], out_dir: Path) -> list[Path]:
    """Per-benchmark accuracy bars and accuracy vs grounding per group (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    names = list(results)
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 3.2))
    ax.bar(names, [results[n]["overall"].get("accuracy", 0.0) for n in names], color="#4c72b0")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy per benchmark")
    fig.tight_layout()
    paths.append(out_dir / "accuracy.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    points = [
        (f"{b}/{g}", m["accuracy"], m["grounding"])
        for b, r in results.items()
        for g, m in r["groups"].items()
        if "grounding" in m
    ]
    if points:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        for label, acc, grounding in points:
            ax.scatter(grounding, acc)
            ax.annotate(label, (grounding, acc), fontsize=7)
        ax.set_xlim(0, 1.05)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("grounding (true / stated facts)")
        ax.set_ylabel("accuracy")
        ax.set_title("Accuracy vs grounding")
        fig.tight_layout()
        paths.append(out_dir / "accuracy_vs_grounding.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_report(results: dict[str, dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "benchmarks": results}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    header = (
        f"# Evaluation of `{meta.get('model', '?')}`\n\n"
        + f"k={meta.get('samples')} samples, temperature {meta.get('temperature')}, "
        f"max_new_tokens {meta.get('max_new_tokens')}.\n\n"
    )
    (out_dir / "report.md").write_text(header + markdown_table(results))
    plots = write_plots(results, out_dir)
    return {
        "results": out_dir / "results.json",
        "report": out_dir / "report.md",
        **{p.stem: p for p in plots},
    }


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """`{"<benchmark>.<metric>": value}` for MLflow metrics and registry tags."""
    return {
        f"{bench}.{metric}": float(value)
        for bench, result in results.items()
        for metric, value in result["overall"].items()
    }


def sample_dump(scores: list[ProblemScore]) -> list[dict[str, Any]]:
    return [asdict(s) for s in scores]


# -------------------------------------------------------------------------------------------- run
REPORT_FILES = ("results.json", "report.md", "accuracy.png", "accuracy_vs_grounding.png")


def generate_benchmark(
    backend: Any, dataset: Any, config: Any, *, processor: Any = None, description: str = "eval"
) -> list[ProblemScore]:
    """Generate `config.samples` responses per problem in batches of `config.sampling.batch_size` and
    score them.
    Prompts are rendered with `processor` (default: the backend's own)."""
    from tgrl_lib.data.images import load_image
    from tgrl_lib.data.prompts import render_prompt
    from tgrl_lib.progress import progress_bar

    processor = processor if processor is not None else getattr(backend, "processor", None)
    if processor is None:
        raise TgrlError(
            f"backend {getattr(backend, 'name', backend)!r} has no processor to render prompts with",
            hint="pass processor= (the model's AutoProcessor)",
        )
    problems = list(dataset.records)[: config.limit] if config.limit else list(dataset.records)
    scores: list[ProblemScore] = []
    with progress_bar(description, len(problems)) as advance:
        for start in range(0, len(problems), config.sampling.batch_size):
            batch = problems[start : start + config.sampling.batch_size]
            prompts = [render_prompt(processor, p.question, p.choices) for p in batch]
            images = [load_image(dataset.image_path(p)) for p in batch]
            groups = backend.generate(
                prompts,
                images,
                samples=config.samples,
                temperature=config.sampling.temperature,
                max_new_tokens=config.sampling.max_new_tokens,
                seed=config.seed + start,
            )
            if len(groups) != len(batch) or any(len(g) != config.samples for g in groups):
                raise TgrlError(
                    f"backend {getattr(backend, 'name', '?')!r} returned {[len(g) for g in groups]} "
                    f"completions for {len(batch)} prompts x {config.samples} samples"
                )
            for problem, group in zip(batch, groups, strict=True):
                lengths = [c.num_tokens for c in group] if all(c.token_ids for c in group) else None
                scores.append(score_problem(problem, [c.text for c in group], lengths))
            advance(len(batch))
    return scores


def _load_benchmarks(benchmarks: dict[str, str | Path]) -> dict[str, Any]:
    """Each benchmark's problems dataset, refused when it is empty or has unreadable rows (a score over a
    silently smaller set would not be the benchmark's score)."""
    from tgrl_lib.data.schema import load_dataset
    from tgrl_lib.store.artifacts import localize

    if not benchmarks:
        raise TgrlError("nothing to evaluate: give at least one benchmark NAME=DIR")
    files: dict[str, str] = {}
    for name in benchmarks:
        other = files.setdefault(_safe_name(name), name)
        if other != name:
            raise TgrlError(f"benchmark names {other!r} and {name!r} would share samples_{_safe_name(name)}")
    datasets = {}
    for name, path in benchmarks.items():
        dataset = load_dataset(localize(str(path)), "problems")
        rows = [e for e in dataset.errors if e.line > 0]  # line 0: a manifest count note, not a row
        if rows:
            raise TgrlError(
                f"benchmark {name!r}: {len(rows)} problem row(s) are unreadable, first: {rows[0]}",
                path=dataset.root,
                hint=f"fix or drop them (`tgrl data validate {dataset.root}`)",
            )
        if not dataset.records:
            raise TgrlError(f"benchmark {name!r} has no problems", path=dataset.root)
        datasets[name] = dataset
    return datasets


def evaluate(
    model: str | Path,
    benchmarks: dict[str, str | Path],
    config: Any,
    out_dir: str | Path,
    *,
    backend: Any = None,
) -> dict[str, Any]:
    """Evaluate `model` on each `{name: problems dataset dir}`; write `results.json`, `report.md`, the PNG
    plots and `samples_<name>.jsonl` (per-problem scores and responses) into `out_dir`, replacing what an
    earlier evaluation wrote there. Returns the `results.json` payload:
    `{"meta": ..., "benchmarks": {name: {"overall": metrics, "groups": {family: metrics}}}}`.

    `config` is an `EvalConfig`. `backend` overrides the one built from `config.backend` (tests, or a
    caller that already holds the model); prompts use its `processor`, else the model's."""
    import time

    from tgrl_lib.generation.factory import make_backend, prompt_processor

    datasets = _load_benchmarks(benchmarks)
    out = Path(out_dir)
    if backend is None:
        backend = make_backend(
            config.backend, str(model), batch_size=config.sampling.batch_size, seed=config.seed
        )
    processor = prompt_processor(backend, str(model), config.backend.trust_remote_code)
    results: dict[str, Any] = {}
    scores: dict[str, list[ProblemScore]] = {}
    timings: dict[str, float] = {}
    for name, dataset in datasets.items():
        t0 = time.perf_counter()
        scores[name] = generate_benchmark(
            backend, dataset, config, processor=processor, description=f"eval {name}"
        )
        timings[name] = time.perf_counter() - t0
        results[name] = summarize(scores[name], config.samples)
    meta = {
        "model": str(model),
        "backend": getattr(backend, "name", config.backend.kind),
        "samples": config.samples,
        "temperature": config.sampling.temperature,
        "max_new_tokens": config.sampling.max_new_tokens,
        "batch_size": config.sampling.batch_size,
        "seed": config.seed,
        "limit": config.limit,
        "seconds": {name: round(t, 3) for name, t in timings.items()},
        "datasets": {name: _manifest_sha256(dataset.root) for name, dataset in datasets.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*(out / f for f in REPORT_FILES), *out.glob("samples_*.jsonl")]:
        stale.unlink(missing_ok=True)  # an earlier run's plot or benchmark must not pass for this one's
    for name, items in scores.items():
        with open(out / f"samples_{_safe_name(name)}.jsonl", "w", encoding="utf-8") as f:
            for row in sample_dump(items):
                f.write(json.dumps(row, sort_keys=True) + "\n")
    write_report(results, out, meta)
    return {"meta": meta, "benchmarks": results}


def _manifest_sha256(root: Path) -> str:
    import hashlib

    return hashlib.sha256((Path(root) / "manifest.json").read_bytes()).hexdigest()


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return cleaned or "benchmark"
