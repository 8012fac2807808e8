"""Trajectory filters (`base`: the Verdict contract and the decorators; `rules`, `batch`, `likelihood`: the
filters; `registry`: filters by name; `report`: counts and plots). `tgrl_lib.filters.run.run_filters`
applies them to a dataset."""

from tgrl_lib.filters.base import FILTERS, FilterContext, Verdict, batch_filter, row_filter
from tgrl_lib.filters.registry import build_filters, describe_filters

__all__ = [
    "FILTERS",
    "FilterContext",
    "Verdict",
    "batch_filter",
    "build_filters",
    "describe_filters",
    "row_filter",
]
