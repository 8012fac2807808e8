"""Expert trajectory generation (the `generate` step): K responses per problem from the configured backend,
each scored with the verifiable reward, written as a trajectories dataset (DESIGN.md §3).

Resumable: trajectories are appended in batches (`DatasetWriter(resume=True)`); a rerun after a crash
keeps what was written, skips problems whose K samples are all present and generates only the missing
sample indices of the others, so nothing is duplicated or lost. The output's manifest is written last.

Every problem row is accounted for: `problems = readable + rejected` and `readable = skipped (already
complete) + generated + failed`; rows the reader refused (bad JSON, missing image, ...) and problems whose
image cannot be decoded go to the rejected dataset with file, line and reason.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tgrl_lib.config import GenerateConfig
from tgrl_lib.data.schema import (
    MANIFEST,
    RECORDS,
    DatasetWriter,
    Problem,
    Rejected,
    RowError,
    Trajectory,
    iter_jsonl,
    load_dataset,
    read_manifest,
)
from tgrl_lib.errors import TgrlError
from tgrl_lib.progress import progress_bar

CREATED_BY = "tgrl generate"


class GenerateReport(BaseModel):
    """What `generate_trajectories` did; the counts reconcile (see the module docstring)."""

    problems: int = Field(description="Problem rows in the input (readable + rejected).")
    readable: int = Field(description="Problems that passed validation.")
    rejected: int = Field(description="Problem rows refused (reader errors and undecodable images).")
    skipped: int = Field(description="Problems already complete from an earlier run (resume).")
    generated: int = Field(description="Problems (fully or partly) generated in this run.")
    trajectories: int = Field(description="Trajectories in the output dataset.")
    new_trajectories: int = Field(description="Trajectories written by this run.")
    correct: int = Field(description="Trajectories in the output whose answer verifies.")
    accuracy: float = Field(description="correct / trajectories.")
    faults: dict[str, int] = Field(default_factory=dict, description="Injected oracle faults, by kind.")
    seconds: float = Field(description="Wall time of this run.")
    backend: str = Field(description="Backend kind and model.")


def expert_name(config: GenerateConfig) -> str:
    """The model part of `source="expert:<model>"`."""
    kind = config.backend.kind
    if kind == "oracle":
        return "oracle"
    model = (config.model or kind).rstrip("/")
    return model.rsplit("/", 1)[-1] if kind in ("hf", "vllm") and "://" not in model else model


def generate_trajectories(
    problems_dir: str | Path,
    out_dir: str | Path,
    config: GenerateConfig,
    *,
    rejected_dir: str | Path | None = None,
    backend: Any = None,
) -> GenerateReport:
    """Write `config.samples_per_problem` scored expert trajectories per problem of `problems_dir` into
    `out_dir` (resuming a partial output there); refused problem rows go to `rejected_dir`."""
    from tgrl_lib.generation.factory import as_expert, make_expert

    start = time.monotonic()
    problems_dir, out_dir = Path(problems_dir), Path(out_dir)
    if out_dir.resolve() == problems_dir.resolve():
        raise TgrlError("--out must differ from --problems", path=out_dir)
    dataset = load_dataset(problems_dir, "problems")
    row_errors = [e for e in dataset.errors if e.line > 0]  # line 0: a manifest count note, not a row
    refused = [e.to_rejected("read") for e in row_errors]
    if refused and rejected_dir is None:
        raise TgrlError(
            f"{len(refused)} problem row(s) are unreadable, first: {row_errors[0]}",
            path=problems_dir,
            hint="pass --rejected DIR to set them aside and generate for the rest",
        )
    K = config.samples_per_problem
    name = expert_name(config)
    meta = {
        "problems": str(problems_dir.resolve()),
        "problems_sha256": dataset.manifest.files.get("records.jsonl"),
        "expert": config.backend.kind,
        "model": name,
        "samples_per_problem": K,
    }
    # Everything that can refuse the run is checked before an output is touched.
    _check_output(out_dir, "trajectories")
    if rejected_dir is not None:
        _check_output(Path(rejected_dir), "rejected")
    _check_resumable(out_dir, dataset.by_id(), K, f"expert:{name}")
    expert = as_expert(backend) if backend is not None else make_expert(config)
    rejected_writer = (
        DatasetWriter(rejected_dir, "rejected", created_by=CREATED_BY, meta=meta)
        if rejected_dir is not None
        else nullcontext()
    )
    # Leaving the `with` writes the rejected manifest, then the trajectories' manifest (last); on an
    # exception neither is written, so a partial output is never readable.
    with (
        DatasetWriter(out_dir, "trajectories", created_by=CREATED_BY, meta=meta, resume=True) as writer,
        rejected_writer as rejected_out,
    ):
        done: dict[str, set[int]] = defaultdict(set)
        for trajectory in writer.existing():
            done[trajectory.problem_id].add(trajectory.meta["sample"])
        todo = [p for p in dataset.records if len(done[p.id]) < K]
        new, failed = _generate_all(expert, dataset, todo, done, config, name, writer)
        if rejected_out is not None:
            rejected_out.write([*refused, *failed])  # the writer escapes what UTF-8 cannot hold
    return _report(dataset, out_dir, refused, failed, todo, new, time.monotonic() - start, config, name)


def _check_output(root: Path, kind: str) -> None:
    """Refuse a directory that holds a dataset `tgrl generate` did not write (never overwrite it)."""
    if (root / MANIFEST).is_file():
        manifest = read_manifest(root)
        if manifest.kind != kind or manifest.created_by != CREATED_BY:
            raise TgrlError(
                f"holds a {manifest.kind} dataset written by {manifest.created_by!r}, not a {kind} output of "
                "tgrl generate",
                path=root,
                hint="use a new directory",
            )


def _check_resumable(out_dir: Path, problems: dict[str, Problem], K: int, source: str) -> None:
    """A partial output in `out_dir` must be one this run would continue: only its last line may be torn,
    and every trajectory must be a sample index < K of a known problem from the same expert."""
    path = out_dir / RECORDS
    if not path.is_file():
        return
    items = list(iter_jsonl(path, Trajectory))
    hint = "use a new --out directory, or the same --problems, --samples and expert as before"
    for position, (line, item) in enumerate(items):
        if isinstance(item, RowError):
            if position == len(items) - 1:
                continue  # the torn last line of a killed run; the writer drops it
            raise TgrlError(f"not a tgrl generate output ({item.reason})", path=path, line=line, hint=hint)
        sample = item.meta.get("sample")
        if item.problem_id not in problems or not isinstance(sample, int) or not 0 <= sample < K:
            what = f"({item.problem_id!r}, sample {sample!r})"
            raise TgrlError(
                f"holds a trajectory {what} that this run would not produce", path=path, line=line, hint=hint
            )
        if item.source != source:
            raise TgrlError(
                f"holds trajectories from {item.source!r}, not {source!r}", path=path, line=line, hint=hint
            )


def _generate_all(
    expert: Any,
    dataset: Any,
    todo: list[Problem],
    done: dict[str, set[int]],
    config: GenerateConfig,
    name: str,
    writer: DatasetWriter,
) -> tuple[int, list[Rejected]]:
    """Generate the missing samples of `todo`, batch by batch, appending each batch to `writer`."""
    K = config.samples_per_problem
    new, failed = 0, []
    lines = _lines_by_id(dataset.root) if todo else {}
    with progress_bar(f"generate ({config.backend.kind})", len(todo)) as advance:
        for start in range(0, len(todo), config.sampling.batch_size):
            batch = todo[start : start + config.sampling.batch_size]
            batch, images, bad = _load_images(expert, dataset, batch, lines)
            failed += bad
            missing = [sorted(set(range(K)) - done[p.id]) for p in batch]
            outputs = sample_batch(expert, batch, images, missing, config) if batch else []
            records = [
                _trajectory(problem, sample, text, info, name, config)
                for problem, samples in zip(batch, outputs, strict=True)
                for sample, text, info in samples
            ]
            writer.write(records)
            new += len(records)
            advance(len(batch) + len(bad))
            if config.throttle_s:
                time.sleep(config.throttle_s)
    return new, failed


def sample_batch(
    expert: Any,
    problems: list[Problem],
    images: list | None,
    missing: list[list[int]],
    config: GenerateConfig,
) -> list[list[tuple[int, str, dict[str, Any]]]]:
    """`(sample index, text, info)` for every missing sample index of every problem.

    The oracle draws sample j from its own seeded RNG, so it is asked for all indices below the largest
    missing one and the missing ones are picked; other backends are asked for as many new samples as are
    missing (problems grouped by that number), which take the missing indices in order."""
    backend = expert.backend
    if hasattr(backend, "generate_with_meta"):
        upto = max(max(m, default=-1) for m in missing) + 1
        rows = backend.generate_with_meta(problems, images, samples=upto)
        return [
            [(j, text, info) for j, (text, info) in enumerate(row) if j in set(wanted)]
            for row, wanted in zip(rows, missing, strict=True)
        ]
    out: list[list[tuple[int, str, dict[str, Any]]]] = [[] for _ in problems]
    by_count: dict[int, list[int]] = defaultdict(list)
    for i, wanted in enumerate(missing):
        if wanted:
            by_count[len(wanted)].append(i)
    for count, rows in sorted(by_count.items()):
        completions = backend.generate(
            [expert.prompt(problems[i]) for i in rows],
            None if images is None else [images[i] for i in rows],
            samples=count,
            temperature=config.sampling.temperature,
            max_new_tokens=config.sampling.max_new_tokens,
            seed=batch_seed(config.seed, [problems[i].id for i in rows]),
        )
        for i, row in zip(rows, completions, strict=True):
            if len(row) != count:
                raise TgrlError(f"backend {backend.name!r} returned {len(row)} samples, expected {count}")
            out[i] = [(j, *completion_info(c)) for j, c in zip(missing[i], row, strict=True)]
    return out


def batch_seed(seed: int, problem_ids: list[str]) -> int:
    """A sampling seed fixed by the run's seed and the batch's problems (the same batch on a rerun draws
    the same samples, whatever batches came before it)."""
    digest = hashlib.sha256(json.dumps([seed, problem_ids]).encode()).digest()
    return int.from_bytes(digest[:4], "big")


def completion_info(completion: Any) -> tuple[str, dict[str, Any]]:
    """Text and meta (generated tokens when known, finish reason) of a backend's `Completion`.

    Unpaired UTF-16 surrogates (a hostile or broken server's JSON escapes), which UTF-8 cannot hold, become
    U+FFFD and are counted in `meta["invalid_unicode"]`: the sample is kept for the filters to judge."""
    text = completion.text
    invalid = sum(1 for c in text if "\ud800" <= c <= "\udfff")
    if invalid:
        text = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text, {
        "tokens": completion.num_tokens or None,
        "finish_reason": completion.finish_reason,
        "invalid_unicode": invalid or None,
    }


def _lines_by_id(root: Path) -> dict[str, int]:
    """Line of each problem id in the problems' records.jsonl (for rejections found after reading)."""
    found: dict[str, int] = {}
    for line, item in iter_jsonl(root / RECORDS, Problem):
        if not isinstance(item, RowError):
            found.setdefault(item.id, line)
    return found


def _load_images(
    expert: Any, dataset: Any, batch: list[Problem], lines: dict[str, int]
) -> tuple[list[Problem], list | None, list[Rejected]]:
    """Decode the batch's images, dropping (and rejecting) problems whose image is unreadable, whatever
    the backend: a trajectory whose image cannot be decoded is useless to the trainer. The oracle reads
    facts, not pixels, so it gets None."""
    from tgrl_lib.data.images import load_image

    kept, images, bad = [], [], []
    for problem in batch:
        try:
            images.append(load_image(dataset.image_path(problem)))
            kept.append(problem)
        except TgrlError as err:
            record = problem.model_dump(mode="json")
            line = lines.get(problem.id)
            bad.append(
                Rejected(stage="generate:image", reason=str(err), file=RECORDS, line=line, record=record)
            )
    return kept, images if expert.needs_images else None, bad


def _trajectory(
    problem: Problem, sample: int, text: str, info: dict[str, Any], name: str, config: GenerateConfig
) -> Trajectory:
    from tgrl_lib.scoring.rewards import reward

    scored = reward(text, problem)
    meta = {"sample": sample, "expert": config.backend.kind}
    meta |= {k: v for k, v in info.items() if v is not None}
    return Trajectory(
        problem_id=problem.id,
        source=f"expert:{name}",
        text=text,
        answer=scored.answer,
        correct=scored.correct,
        reward=scored.reward,
        meta=meta,
    )


def _report(
    dataset: Any,
    out_dir: Path,
    refused: list[Rejected],
    failed: list[Rejected],
    todo: list[Problem],
    new: int,
    seconds: float,
    config: GenerateConfig,
    name: str,
) -> GenerateReport:
    written = load_dataset(out_dir, "trajectories")
    faults = Counter(t.meta["fault"] for t in written.records if t.meta.get("fault"))
    correct = sum(t.correct for t in written.records)
    return GenerateReport(
        problems=len(dataset.records) + len(refused),
        readable=len(dataset.records),
        rejected=len(refused) + len(failed),
        skipped=len(dataset.records) - len(todo),
        generated=len(todo) - len(failed),
        trajectories=len(written.records),
        new_trajectories=new,
        correct=correct,
        accuracy=correct / len(written.records) if written.records else 0.0,
        faults=dict(sorted(faults.items())),
        seconds=round(seconds, 3),
        backend=f"{config.backend.kind}:{name}",
    )
