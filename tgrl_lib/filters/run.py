"""Trajectory filtering (the `filter` step): apply the configured filters in order, keep the survivors, and
write every refused row to a `rejected` dataset with the stage and reason that refused it.

Filters are the small functions of `tgrl_lib.filters` (`(trajectory, context) -> Verdict`, or a list for
batch filters), configured by `FilterConfig.filters`. The first filter that rejects a trajectory gives its
reason; later filters see only the survivors. Rows that cannot be read (bad JSON, missing fields, a problem
id the problems dataset does not have) are rejected at stage `read` with their file and line.

Problems (for answers and facts) come from `problems_dir`, or from `meta["problems"]` of the trajectories'
manifest, which `tgrl generate` records.

Resumable by recomputation: filtering is deterministic, so a killed run is simply run again; both output
directories lose their manifest at the start and get it back last (the kept dataset's manifest is written
after the rejected one's), so a partial output is never readable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tgrl_lib.config import FilterConfig
from tgrl_lib.data.schema import (
    LONE_SURROGATE,
    MANIFEST,
    RECORDS,
    DatasetWriter,
    FilterVerdict,
    Rejected,
    RowError,
    Trajectory,
    dumps_record,
    iter_jsonl,
    load_dataset,
    read_manifest,
    utf8_encodable,
    writable_rejected,
)
from tgrl_lib.errors import TgrlError
from tgrl_lib.filters.base import FilterContext
from tgrl_lib.filters.registry import BoundFilter, build_filters
from tgrl_lib.filters.report import READ_STAGE, FilterCounts, FilterReport, build_report, write_report
from tgrl_lib.progress import progress_bar

CREATED_BY = "tgrl filter"
OUTPUT_FILES = {
    MANIFEST,
    MANIFEST + ".tmp",
    RECORDS,
    RECORDS + ".tmp",
    "report.json",
    "report.md",
    "report_reasons.png",
    "report_logprobs.png",
}


class _Row:
    """One readable trajectory on its way through the filters."""

    __slots__ = ("family", "line", "reason", "stage", "trajectory")

    def __init__(self, trajectory: Trajectory, line: int, family: str):
        self.trajectory = trajectory
        self.line = line
        self.family = family
        self.stage: str | None = None
        self.reason: str | None = None


def run_filters(
    in_dir: str | Path,
    out_dir: str | Path,
    rejected_dir: str | Path,
    config: FilterConfig,
    problems_dir: str | Path | None = None,
    policy: str | None = None,
) -> FilterReport:
    """Filter the trajectories dataset `in_dir` into `out_dir` (kept) and `rejected_dir` (refused rows);
    the report (JSON, markdown, PNG) goes into `out_dir`. Returns the report."""
    in_dir, out_dir, rejected_dir = Path(in_dir), Path(out_dir), Path(rejected_dir)
    _check_dirs(in_dir, out_dir, rejected_dir)
    filters = build_filters(config.filters)
    trajectories = load_dataset(in_dir, "trajectories")  # checks the manifest and records.jsonl's sha256
    problems_root = _problems_dir(in_dir, trajectories.manifest.meta, problems_dir)
    problems = load_dataset(problems_root, "problems")
    context = FilterContext(
        problems=problems.by_id(),
        problems_root=problems_root,
        policy_path=policy or config.policy,
        batch_size=config.batch_size,
    )
    warnings = [f"{e}" for e in trajectories.errors if e.line == 0]
    if problems.errors:
        warnings.append(
            f"{len(problems.errors)} unreadable problem row(s) in {problems_root}; see data validate"
        )

    rows, read_rejected = _read_rows(in_dir / RECORDS, context)
    per_filter = {f.name: _apply(f, rows, context) for f in filters}

    kept = [r for r in rows if r.stage is None]
    refused = [(r.line, _rejected_row(r)) for r in rows if r.stage is not None] + read_rejected
    refused.sort(key=lambda item: item[0])
    logprobs = _logprobs(rows)
    outcomes = [(r.family, r.stage, r.reason) for r in rows]
    outcomes += [(_family_of(rej, context), READ_STAGE, rej.reason) for _, rej in read_rejected]
    report = build_report(
        outcomes,
        per_filter,
        logprobs,
        length_unit="tokens" if context.policy_path else "words",
        filters=[spec.model_dump() for spec in config.filters],
        warnings=warnings,
    )
    meta = {"problems": str(problems_root.resolve()), "source": str(in_dir.resolve())}
    _clear_outputs(out_dir, rejected_dir)
    verdict = FilterVerdict(kept=True)
    # Leaving the `with` closes the writers right to left: the rejected manifest, then the kept one (last).
    with (
        DatasetWriter(out_dir, "trajectories", created_by=CREATED_BY, meta=meta) as kept_writer,
        DatasetWriter(rejected_dir, "rejected", created_by=CREATED_BY, meta=meta) as rejected_writer,
    ):
        rejected_writer.write(rej for _, rej in refused)
        kept_writer.write(r.trajectory.model_copy(update={"filter": verdict}) for r in kept)
        write_report(report, out_dir, logprobs)
    return report


def _check_dirs(in_dir: Path, out_dir: Path, rejected_dir: Path) -> None:
    """Refuse to overwrite anything `tgrl filter` did not write (checked before any work is done)."""
    resolved = [p.resolve() for p in (in_dir, out_dir, rejected_dir)]
    if len(set(resolved)) != 3:
        raise TgrlError("--in, --out and --rejected must be three different directories")
    for path in (out_dir, rejected_dir):
        if not path.exists():
            continue
        stray = sorted(p.name for p in path.iterdir() if p.name not in OUTPUT_FILES)
        if stray:
            raise TgrlError(
                f"output directory holds {stray[0]!r}, which tgrl filter did not write",
                path=path,
                hint="use an empty or new directory",
            )
        writer = read_manifest(path).created_by if (path / MANIFEST).is_file() else CREATED_BY
        if writer != CREATED_BY:
            raise TgrlError(
                f"output directory holds a dataset written by {writer!r}, not by tgrl filter",
                path=path,
                hint="use an empty or new directory (is --out swapped with --in?)",
            )


def _clear_outputs(*paths: Path) -> None:
    """Remove what an earlier (possibly killed) run of tgrl filter left, so this run rewrites it all."""
    for path in paths:
        for name in OUTPUT_FILES:
            (path / name).unlink(missing_ok=True)


def _problems_dir(in_dir: Path, meta: dict[str, Any], problems_dir: str | Path | None) -> Path:
    if problems_dir is not None:
        return Path(problems_dir)
    recorded = meta.get("problems")
    if not recorded:
        raise TgrlError(
            "the trajectories' manifest does not name their problems dataset",
            path=in_dir / MANIFEST,
            hint="pass --problems DIR",
        )
    path = Path(recorded)
    if not (path / MANIFEST).is_file():
        raise TgrlError(
            f"the problems dataset recorded in the manifest ({path}) is not readable here",
            path=in_dir / MANIFEST,
            hint="pass --problems DIR",
        )
    return path


def _read_rows(records: Path, context: FilterContext) -> tuple[list[_Row], list[tuple[int, Rejected]]]:
    """Readable trajectories with their line, and the rows refused at stage `read`."""
    rows: list[_Row] = []
    refused: list[tuple[int, Rejected]] = []
    for line, item in iter_jsonl(records, Trajectory):
        if isinstance(item, RowError):
            refused.append((line, writable_rejected(item.to_rejected(READ_STAGE))))
            continue
        problem = context.problems.get(item.problem_id)
        reason = None if problem is not None else f"unknown problem id {item.problem_id!r}"
        if reason is None and not utf8_encodable(_dump(item)):
            reason = LONE_SURROGATE
        if reason is not None:
            refused.append(
                (line, writable_rejected(RowError(RECORDS, line, reason, _dump(item)).to_rejected()))
            )
            continue
        rows.append(_Row(item, line, str(problem.meta.get("family", "unknown"))))
    return rows, refused


def _dump(record: Trajectory) -> str:
    return dumps_record(record)


def _apply(bound: BoundFilter, rows: list[_Row], context: FilterContext) -> FilterCounts:
    """Run one filter over the rows still alive; mark the ones it rejects."""
    alive = [r for r in rows if r.stage is None]
    if bound.kind == "batch":
        verdicts = bound([r.trajectory for r in alive], context)
    else:
        verdicts = []
        with progress_bar(f"filter {bound.name}", len(alive)) as advance:
            for row in alive:
                verdicts.append(bound(row.trajectory, context))
                advance()
    if len(verdicts) != len(alive):
        raise TgrlError(
            f"filter {bound.name!r} returned {len(verdicts)} verdicts for {len(alive)} trajectories"
        )
    rejected = 0
    for row, verdict in zip(alive, verdicts, strict=True):
        if not verdict.kept:
            row.stage, row.reason = f"filter:{bound.name}", verdict.reason or bound.name
            rejected += 1
    return FilterCounts(seen=len(alive), rejected=rejected)


def _rejected_row(row: _Row) -> Rejected:
    name = (row.stage or "").removeprefix("filter:")
    verdict = FilterVerdict(kept=False, filter=name, reason=row.reason)
    record = row.trajectory.model_copy(update={"filter": verdict}).model_dump(mode="json")
    return Rejected(
        stage=row.stage or "", reason=row.reason or "", file=RECORDS, line=row.line, record=record
    )


def _family_of(rejected: Rejected, context: FilterContext) -> str:
    """The task family of a row refused on reading, when its problem id is still recognisable."""
    problem_id = (rejected.record or {}).get("problem_id")
    problem = context.problems.get(problem_id) if isinstance(problem_id, str) else None
    return str(problem.meta.get("family", "unknown")) if problem is not None else "unknown"


def _logprobs(rows: list[_Row]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"kept": [], "rejected": []}
    for row in rows:
        value = row.trajectory.meta.get("logprob_mean")
        if isinstance(value, int | float):
            out["kept" if row.stage is None else "rejected"].append(float(value))
    return out
