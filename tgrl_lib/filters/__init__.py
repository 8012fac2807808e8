"""Trajectory filters (`base`: the Verdict/registry contract; `rules`, `batch`, `likelihood`: the filters;
`report`: counts and plots). `tgrl_lib.filters.run.run_filters` applies them to a dataset."""

from tgrl_lib.filters.base import (
    FILTERS,
    FilterContext,
    Verdict,
    batch_filter,
    build_filters,
    describe_filters,
    row_filter,
)

__all__ = [
    "FILTERS",
    "FilterContext",
    "Verdict",
    "batch_filter",
    "build_filters",
    "describe_filters",
    "row_filter",
]
