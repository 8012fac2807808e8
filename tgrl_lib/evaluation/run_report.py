"""The run report (report.html): what a person opens after a pipeline run.

One self-contained page: the run's name and algorithm, start -> final accuracy and grounding beside the
blind prior, the promotion decision with its reason, and three plots with their data: accuracy per family
(start and final model, blind prior marked), accuracy vs grounding per family, and the training curves of
reward and accuracy from the trainer's per-step metrics. Plots are PNGs inlined as data URLs, so the page
is one file (a KFP `HTML` artifact, an MLflow artifact).
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAIN_HISTORY = "train_metrics.jsonl"  # the trainer's per-step metrics, copied into its checkpoint
BLIND_PRIOR = "blind_prior.json"  # written beside results.json by the evaluate step (blind_prior.py)


@dataclass
class RunSummary:
    """What the report shows; `final`/`start` are `results.json` payloads of the same evaluation."""

    name: str
    algorithm: str
    final: dict[str, Any]
    start: dict[str, Any] | None = None
    blind_prior: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # the trainer's metrics.jsonl rows
    decision: dict[str, Any] = field(default_factory=dict)  # registered.json: version, promoted, reason


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_results(eval_dir: str | Path) -> dict[str, Any] | None:
    """The results.json payload of an evaluation output directory (None when it has none)."""
    return _read(Path(eval_dir) / "results.json")


def summary_from_dirs(
    name: str,
    model_dir: str | Path,
    eval_dir: str | Path,
    start_eval_dir: str | Path | None,
    decision: dict[str, Any],
    *,
    default_algorithm: str,
) -> RunSummary:
    """A `RunSummary` from a pipeline's outputs: the trained checkpoint (its trainer_state.json names the
    algorithm, its TRAIN_HISTORY holds the curves), the two evaluations, the registration. `{algorithm}`
    in `name` is filled in."""
    state = _read(Path(model_dir) / "trainer_state.json") or {}
    algorithm = str(state.get("config", {}).get("algorithm", default_algorithm))
    return RunSummary(
        name=name.format(algorithm=algorithm),
        algorithm=algorithm,
        final=_read(Path(eval_dir) / "results.json") or {},
        start=_read(Path(start_eval_dir) / "results.json") if start_eval_dir else None,
        blind_prior=_read(Path(eval_dir) / BLIND_PRIOR),
        history=read_history(Path(model_dir) / TRAIN_HISTORY),
        decision=decision,
    )


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a trainer's metrics.jsonl ([] when absent)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _groups(results: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """`{"<benchmark>/<family>": metrics}` over every benchmark of a results.json payload."""
    if not results:
        return {}
    return {
        f"{bench}/{group}": metrics
        for bench, r in results.get("benchmarks", {}).items()
        for group, metrics in r.get("groups", {}).items()
    }


def overall(results: dict[str, Any] | None, key: str) -> float | None:
    """Mean of `key` over the benchmarks' overall metrics (None when no benchmark has it)."""
    if not results:
        return None
    values = [
        b["overall"][key] for b in results.get("benchmarks", {}).values() if key in b.get("overall", {})
    ]
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------------- plots
def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def accuracy_plot(summary: RunSummary) -> bytes:
    """Accuracy per family: start and final model side by side, the blind prior as a black tick."""
    import matplotlib.pyplot as plt

    final, start = _groups(summary.final), _groups(summary.start)
    names = list(final)
    prior = (summary.blind_prior or {}).get("groups", {})
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 3.6))
    xs = range(len(names))
    width = 0.4
    if start:
        ax.bar([x - width / 2 for x in xs], [start.get(n, {}).get("accuracy", 0.0) for n in names], width,
               label="start", color="#aaaaaa")  # fmt: skip
    finals = [final[n].get("accuracy", 0.0) for n in names]
    ax.bar([x + (width / 2 if start else 0) for x in xs], finals, width, label="final", color="#4c72b0")
    for x, value in zip(xs, finals, strict=True):
        ax.annotate(f"{value:.2f}", (x + (width / 2 if start else 0), value), ha="center", fontsize=7,
                    xytext=(0, 2), textcoords="offset points")  # fmt: skip
    ticks = [
        (x, prior[n.split("/", 1)[1]]) for x, n in zip(xs, names, strict=True) if n.split("/", 1)[1] in prior
    ]
    if ticks:
        ax.scatter([t[0] for t in ticks], [t[1] for t in ticks], marker="_", s=400, color="black",
                   label="blind prior", zorder=3)  # fmt: skip
    ax.set_xticks(list(xs), [n.split("/", 1)[1] for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Accuracy per family")
    ax.legend(fontsize=7)
    return _png(fig)


def grounding_plot(summary: RunSummary) -> bytes:
    """Accuracy vs grounding per family; start (hollow) -> final (filled) joined by a line."""
    import matplotlib.pyplot as plt

    final, start = _groups(summary.final), _groups(summary.start)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    for name, m in final.items():
        x, y = m.get("grounding", 0.0), m.get("accuracy", 0.0)
        ax.scatter([x], [y], color="#4c72b0")
        ax.annotate(name.split("/", 1)[1], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if name in start:
            sx, sy = start[name].get("grounding", 0.0), start[name].get("accuracy", 0.0)
            ax.scatter([sx], [sy], facecolors="none", edgecolors="#888888")
            ax.plot([sx, x], [sy, y], color="#cccccc", linewidth=0.8, zorder=0)
    ax.set_xlim(-0.02, 1.05)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("grounding (true / stated facts)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy vs grounding (hollow: start)")
    return _png(fig)


def training_plot(summary: RunSummary) -> bytes | None:
    """Reward and on-policy accuracy per training step (None without reward rows, e.g. SFT only)."""
    import matplotlib.pyplot as plt

    rows = [r for r in summary.history if "reward/mean" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    steps = [r["step"] for r in rows]
    for key, color in (("reward/mean", "#dd8452"), ("reward/accuracy", "#4c72b0")):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key, color=color, marker=".")
    ax.set_xlabel("training step")
    ax.set_ylabel("on-policy value")
    ax.set_title(f"Training curves ({summary.algorithm})")
    ax.legend(fontsize=7)
    return _png(fig)


# -------------------------------------------------------------------------------------------- page
def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _summary_rows(summary: RunSummary) -> list[tuple[str, str]]:
    start_acc, final_acc = overall(summary.start, "accuracy"), overall(summary.final, "accuracy")
    start_gr, final_gr = overall(summary.start, "grounding"), overall(summary.final, "grounding")
    count = sum(int(b["overall"].get("count", 0)) for b in summary.final.get("benchmarks", {}).values())
    d = summary.decision
    decision = "promoted to @champion" if d.get("promoted") else "not promoted"
    return [
        ("run", summary.name),
        ("algorithm", summary.algorithm),
        ("held-out accuracy (start -> final)", f"{_fmt(start_acc)} -> {_fmt(final_acc)} ({count} problems)"),
        ("grounding (start -> final)", f"{_fmt(start_gr)} -> {_fmt(final_gr)}"),
        ("blind prior (train split's most frequent answer per type)",
         _fmt((summary.blind_prior or {}).get("accuracy"))),
        ("model version", str(d.get("model_uri", "-"))),
        ("promotion", f"{decision}: {d.get('reason', '')}"),
    ]  # fmt: skip


def render(summary: RunSummary) -> str:
    """The report page as one HTML string."""
    plots = [
        ("accuracy per family", accuracy_plot(summary)),
        ("accuracy vs grounding", grounding_plot(summary)),
    ]
    curves = training_plot(summary)
    if curves is not None:
        plots.append(("training curves", curves))
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _summary_rows(summary)
    )
    images = "".join(
        f'<figure><img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{html.escape(alt)}</figcaption></figure>'
        for alt, png in plots
    )
    title = f"{summary.name}: {summary.algorithm}"
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:1em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}figure{display:inline-block;margin:.5em}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><table>{rows}</table>"
        f"<h2>Plots</h2>{images}</body></html>\n"
    )


def markdown_page(markdown_path: Path, images: list[Path], out_path: str | Path, title: str) -> None:
    """A self-contained HTML page (KFP `HTML` artifact): the markdown report's headings, paragraphs and
    tables, then the PNG plots inlined as data URLs."""
    body = []
    lines = markdown_path.read_text(encoding="utf-8").splitlines() if markdown_path.is_file() else []
    table: list[list[str]] = []
    for line in [*lines, ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                table.append(cells)
            continue
        if table:
            head, *rows = table
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
            body.append("</table>")
            table = []
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 4)
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    for image in images:
        data = base64.b64encode(image.read_bytes()).decode()
        body.append(f'<p><img alt="{html.escape(image.stem)}" src="data:image/png;base64,{data}"></p>')
    style = (
        "body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px}"
    )
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
    page += f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(page, encoding="utf-8")


def write_run_report(summary: RunSummary, out_path: str | Path) -> Path:
    """Render `summary` to `out_path` (parents created)."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(summary), encoding="utf-8")
    return out
