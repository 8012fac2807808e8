"""What a trajectory filter is: a small named function returning a `Verdict`, and the registry of them.

Two shapes (STYLE.md rule 6):

- a *row* filter judges one trajectory: `(trajectory, context, **params) -> Verdict`;
- a *batch* filter judges a list (duplicates, per-problem caps and the policy likelihood need to see the
  other trajectories or to batch a model): `(trajectories, context, **params) -> list[Verdict]`.

Each filter declares its parameters as a `FilterParams` model (typed, bounded, finite, strict: `[1, 2]`,
`true` or `"3"` is not an integer, NaN is not a threshold; unknown keys refused) and receives the validated
model as its third argument. Filters are registered by name with `@row_filter("name", Params)` /
`@batch_filter("name", Params)` and configured by a list of `{name, params}` in YAML
(`FilterConfig.filters`). `tgrl_lib.filters.registry.build_filters` builds each filter's params model
before any data is read, so a typo or an out-of-range value fails at once in one line naming the filter and
the key.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

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


class FilterParams(BaseModel):
    """A filter's parameters: typed and bounded (a `description` on every field), finite, strict types,
    no unknown keys. A filter without parameters uses this class as is."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


RowFn = Callable[..., Verdict]
BatchFn = Callable[..., list[Verdict]]


@dataclass(frozen=True)
class FilterDef:
    name: str
    kind: Literal["row", "batch"]
    fn: Callable[..., Any]
    doc: str
    params_model: type[FilterParams] = FilterParams

    def params(self) -> dict[str, Any]:
        """Parameters and their defaults (what `tgrl filter --list` shows)."""
        return {name: field.default for name, field in self.params_model.model_fields.items()}

    def build_params(self, given: dict[str, Any]) -> FilterParams:
        """`given` validated into this filter's params model; a one-line `TgrlError` naming the filter and
        the key otherwise."""
        try:
            return self.params_model.model_validate(given)
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(x) for x in first["loc"])
            hint = f"its parameters: {', '.join(self.params()) or 'none'}"
            if first["type"] == "extra_forbidden":
                raise TgrlError(f"filter {self.name!r} has no parameter {key!r}", hint=hint) from None
            where = f"parameter {key!r}" if key else "parameters"
            message = first["msg"].removeprefix("Value error, ")
            raise TgrlError(f"filter {self.name!r} {where}: {message}", hint=hint) from None


FILTERS: dict[str, FilterDef] = {}


def _register(name: str, kind: Literal["row", "batch"], params: type[FilterParams]):
    def wrap(fn):
        if name in FILTERS:
            raise TgrlError(f"filter {name!r} is registered twice")
        doc = inspect.getdoc(fn) or ""
        FILTERS[name] = FilterDef(name, kind, fn, doc.split("\n\n")[0].replace("\n", " "), params)
        return fn

    return wrap


def row_filter(name: str, params: type[FilterParams] = FilterParams):
    """Register `fn(trajectory, context, params) -> Verdict` under `name`, configured by `params`."""
    return _register(name, "row", params)


def batch_filter(name: str, params: type[FilterParams] = FilterParams):
    """Register `fn(trajectories, context, params) -> list[Verdict]` under `name`, configured by
    `params`."""
    return _register(name, "batch", params)
