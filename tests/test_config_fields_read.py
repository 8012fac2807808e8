"""No config key is ignored: every field of every step's config is read by library code, and every key the
GPU recipes set is such a field.

Read means an attribute access `.field` (or `getattr(x, "field")`) in tgrl_lib, components or pipelines
outside the module that defines the models. This is a static check: it cannot tell which object the
attribute is read from, but a field that nothing reads anywhere (a key a recipe sets for nothing) fails it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import BaseModel

from tgrl_lib.config import PipelineConfig
from tgrl_lib.recipe import read_yaml

REPO = Path(__file__).resolve().parents[1]
SOURCES = [
    *(REPO / "tgrl_lib").rglob("*.py"),
    *(REPO / "components").glob("*.py"),
    *(REPO / "pipelines").glob("*.py"),
]
DEFINITIONS = {REPO / "tgrl_lib" / "config.py"}


def attributes_read(paths: list[Path]) -> set[str]:
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif (
                (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "id", None) == "getattr"
                    and len(node.args) > 1
                )
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                names.add(node.args[1].value)
    return names


READ = attributes_read([p for p in SOURCES if p not in DEFINITIONS])


def fields(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    """Dotted key -> field name, for every field of `model` and its sub-models."""
    out = {}
    for name, info in model.model_fields.items():
        out[prefix + name] = name
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out |= fields(sub, f"{prefix}{name}.")
    return out


ALL_FIELDS = fields(PipelineConfig)


def leaf_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        if isinstance(value, dict):
            keys += leaf_keys(value, f"{prefix}{key}.")
        keys.append(prefix + key)
    return keys


def test_the_check_sees_a_field_nobody_reads():  # positive control
    assert "gpu_memory_utilization" in READ and "surely_never_read_field" not in READ


@pytest.mark.parametrize("key", sorted(ALL_FIELDS), ids=str)
def test_every_config_field_is_read_by_the_library(key):
    assert ALL_FIELDS[key] in READ, f"{key} is never read"


@pytest.mark.parametrize("recipe", ["qwen2.5-vl-3b.yaml", "qwen2.5-vl-7b.yaml", "tiny-cpu.yaml"])
def test_every_key_a_recipe_sets_is_a_field_that_is_read(recipe):
    keys = [k for k in leaf_keys(read_yaml(REPO / "configs" / recipe)) if not k.startswith("filter.filters")]
    unknown = [k for k in keys if k not in ALL_FIELDS]
    assert unknown == []
    unread = [k for k in keys if ALL_FIELDS[k] not in READ]
    assert unread == []
