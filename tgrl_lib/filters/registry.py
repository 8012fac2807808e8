"""The filters by name: bind a recipe's `{name, params}` list to the registered filters, list them.

Importing this module imports the built-in filter modules (`rules`, `batch`, `likelihood`), whose decorators
register them in `base.FILTERS`; `base` itself imports none of them, so the dependency runs one way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tgrl_lib.errors import TgrlError
from tgrl_lib.filters import batch, likelihood, rules  # noqa: F401  (registers the built-in filters)
from tgrl_lib.filters.base import FILTERS, FilterContext, FilterDef, FilterParams


@dataclass(frozen=True)
class BoundFilter:
    """A registered filter with its validated parameters."""

    definition: FilterDef
    params: FilterParams

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def kind(self) -> str:
        return self.definition.kind

    def __call__(self, items: Any, context: FilterContext) -> Any:
        return self.definition.fn(items, context, self.params)


def build_filters(specs: list[Any]) -> list[BoundFilter]:
    """`FilterSpec`s -> bound filters; unknown names and bad parameters (unknown, wrong type, out of range,
    not finite) raise a one-line `TgrlError` naming the filter and the key."""
    bound = []
    for spec in specs:
        definition = FILTERS.get(spec.name)
        if definition is None:
            raise TgrlError(
                f"unknown filter {spec.name!r}", hint=f"known filters: {', '.join(sorted(FILTERS))}"
            )
        bound.append(BoundFilter(definition, definition.build_params(dict(spec.params))))
    return bound


def describe_filters() -> list[dict[str, Any]]:
    """Name, kind, one-line doc and parameters of every filter (for `tgrl filter --list`)."""
    return [
        {"name": d.name, "kind": d.kind, "doc": d.doc, "params": d.params()}
        for d in sorted(FILTERS.values(), key=lambda d: d.name)
    ]
