"""What a trajectory filter is: a small named function returning a `Verdict`, and the registry of them.

Two shapes (STYLE.md rule 6):

- a *row* filter judges one trajectory: `(trajectory, context, **params) -> Verdict`;
- a *batch* filter judges a list (duplicates, per-problem caps and the policy likelihood need to see the
  other trajectories or to batch a model): `(trajectories, context, **params) -> list[Verdict]`.

Filters are registered by name with `@row_filter("name")` / `@batch_filter("name")` and configured by a
list of `{name, params}` in YAML (`FilterConfig.filters`). `build_filters` checks names and parameters
before any data is read, so a typo fails at once and names the filter.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tgrl_lib.data.schema import Problem, Trajectory
from tgrl_lib.errors import TgrlError


@dataclass(frozen=True)
class Verdict:
    """Keep or reject, and why (the reason is written next to every rejected trajectory)."""

    kept: bool
    reason: str | None = None


KEEP = Verdict(True)


def reject(reason: str) -> Verdict:
    return Verdict(False, reason)


@dataclass
class FilterContext:
    """What filters may look at besides the trajectory: the problems and, when given, the policy."""

    problems: dict[str, Problem]
    problems_root: Any = None  # Path of the problems dataset (images), for the likelihood filter
    policy_path: str | None = None
    batch_size: int = 16
    _policy: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)

    def problem(self, trajectory: Trajectory) -> Problem:
        return self.problems[trajectory.problem_id]

    def policy(self) -> Any:
        """The loaded policy (a `models.policy.Policy`), loaded once; a filter that needs it fails without
        it."""
        if self._policy is None:
            if not self.policy_path:
                raise TgrlError(
                    "this filter needs a policy checkpoint", hint="pass --policy PATH or set filter.policy"
                )
            import torch

            from tgrl_lib.models.policy import load_policy

            device = "cuda" if torch.cuda.is_available() else None
            self._policy = load_policy(self.policy_path, device=device)
            self._tokenizer = self._policy.tokenizer
        return self._policy

    def tokenizer(self) -> Any | None:
        """The policy's tokenizer (a local checkpoint's tokenizer loads without its weights), or None."""
        if self._tokenizer is None and self.policy_path:
            if self._policy is not None or "://" in self.policy_path:
                self._tokenizer = self.policy().tokenizer
            else:
                from transformers import AutoTokenizer

                from tgrl_lib.models.policy import check_checkpoint_dir

                check_checkpoint_dir(Path(self.policy_path))
                try:
                    self._tokenizer = AutoTokenizer.from_pretrained(self.policy_path)
                except (OSError, ValueError) as err:
                    raise TgrlError(
                        f"cannot load the policy tokenizer: {err}", path=self.policy_path
                    ) from err
        return self._tokenizer


RowFn = Callable[..., Verdict]
BatchFn = Callable[..., list[Verdict]]


@dataclass(frozen=True)
class FilterDef:
    name: str
    kind: Literal["row", "batch"]
    fn: Callable[..., Any]
    doc: str

    def params(self) -> dict[str, Any]:
        """Keyword parameters and their defaults (what `tgrl filter --list` shows)."""
        signature = inspect.signature(self.fn)
        return {
            name: p.default
            for name, p in signature.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }


FILTERS: dict[str, FilterDef] = {}


def _register(name: str, kind: Literal["row", "batch"]):
    def wrap(fn):
        if name in FILTERS:
            raise TgrlError(f"filter {name!r} is registered twice")
        doc = inspect.getdoc(fn) or ""
        FILTERS[name] = FilterDef(name, kind, fn, doc.split("\n\n")[0].replace("\n", " "))
        return fn

    return wrap


def row_filter(name: str):
    """Register `fn(trajectory, context, *, params...) -> Verdict` under `name`."""
    return _register(name, "row")


def batch_filter(name: str):
    """Register `fn(trajectories, context, *, params...) -> list[Verdict]` under `name`."""
    return _register(name, "batch")


@dataclass(frozen=True)
class BoundFilter:
    """A registered filter with its configured parameters."""

    definition: FilterDef
    params: dict[str, Any]

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def kind(self) -> str:
        return self.definition.kind

    def __call__(self, items: Any, context: FilterContext) -> Any:
        return self.definition.fn(items, context, **self.params)


def build_filters(specs: list[Any]) -> list[BoundFilter]:
    """`FilterSpec`s -> bound filters; unknown names and unknown parameters raise `TgrlError`."""
    _load_builtin()
    bound = []
    for spec in specs:
        definition = FILTERS.get(spec.name)
        if definition is None:
            raise TgrlError(
                f"unknown filter {spec.name!r}", hint=f"known filters: {', '.join(sorted(FILTERS))}"
            )
        allowed = definition.params()
        unknown = sorted(set(spec.params) - set(allowed))
        if unknown:
            raise TgrlError(
                f"filter {spec.name!r} has no parameter {unknown[0]!r}",
                hint=f"its parameters: {', '.join(allowed) or 'none'}",
            )
        bound.append(BoundFilter(definition, dict(spec.params)))
    return bound


def _load_builtin() -> None:
    """Import the modules that register the built-in filters."""
    from tgrl_lib.filters import batch, likelihood, rules  # noqa: F401


def describe_filters() -> list[dict[str, Any]]:
    """Name, kind, one-line doc and parameters of every filter (for `tgrl filter --list`)."""
    _load_builtin()
    return [
        {"name": d.name, "kind": d.kind, "doc": d.doc, "params": d.params()}
        for d in sorted(FILTERS.values(), key=lambda d: d.name)
    ]
