"""Recipes: YAML files (or text) and `--set` overrides -> validated config models; the one loader.

`load_config` reads a whole recipe or one step's section of it, applies `--set key=value` overrides and
explicit flags on top, and validates the result with the step's model. YAML is read safely and a key given
twice is refused, naming both lines. A validation error is one line naming the key, with the nearest valid
key for a misspelt one and the new place of a key that moved.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tgrl_lib.config import PipelineConfig, StepConfig
from tgrl_lib.errors import TgrlError


# ------------------------------------------------------------------------------------ loading, --set
def _format_validation(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {loc}: {first['msg']}{more}"


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`["train.lr=1e-4", "train.loss.clip=false"]` -> nested dict; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise TgrlError(f"--set expects key=value, got {pair!r}")
        value = _parse_scalar(raw)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TgrlError(f"--set {pair!r} conflicts with another --set")
        node[parts[-1]] = value
    return nested


def _parse_scalar(raw: str) -> Any:
    """YAML scalar, except that numbers YAML 1.1 leaves as strings (`3e-4`) become floats."""
    if not raw.strip():
        return ""
    try:
        return float(raw) if "e" in raw.lower() and not raw.strip().isalpha() else yaml.safe_load(raw)
    except (ValueError, yaml.YAMLError):
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping: plain PyYAML keeps the last one silently,
    so a recipe with two `lr:` lines would train with whichever came second."""


def _unique_mapping(loader: _RecipeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may override on purpose
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} given twice (first on line {first[key] + 1}); keep one",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark.line
        except TypeError:  # unhashable key: construct_mapping reports it
            pass
    return loader.construct_mapping(node, deep=True)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _load_recipe(text: str) -> Any:
    loader = _RecipeLoader(text)  # a SafeLoader: no Python object tags
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TgrlError("config file not found", path=path)
    try:
        data = _load_recipe(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(err, "problem", None) or err
        raise TgrlError(f"invalid YAML ({reason})", path=path, line=line) from None
    except UnicodeDecodeError:
        raise TgrlError("config is not UTF-8 text", path=path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TgrlError("config must be a mapping of step sections", path=path)
    return data


def load_config(
    path: Path | str | None,
    model: type[T] = PipelineConfig,
    overrides: list[str] | None = None,
    section: str | None = None,
) -> T:
    """Load a recipe (or one `section` of it) into `model`, applying `--set` overrides on top."""
    data = read_yaml(path) if path is not None else {}
    if section is not None:
        data = _section(data, section, path)
    data = deep_merge(data, parse_overrides(overrides))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise TgrlError(_format_validation(err, str(path or "--set"))) from None


def _section(data: dict[str, Any], section: str, path: Path | str | None) -> dict[str, Any]:
    """`data[section]` of a recipe, refusing unknown sections (a misspelt one would be silently ignored) and
    a section that is not a mapping; `data` itself when it holds no known section (a file of section keys,
    which `model` validates)."""
    sections = set(PipelineConfig.model_fields)
    if section not in data and not set(data) & sections:
        return data
    unknown = sorted(str(key) for key in set(data) - sections)
    if unknown:
        raise TgrlError(
            f"unknown section(s) {', '.join(unknown)}",
            path=path,
            hint=f"sections: {', '.join(sorted(sections))}",
        )
    value = data.get(section)
    if value is not None and not isinstance(value, dict):
        raise TgrlError(
            f"section {section!r} must be a mapping of keys, got {type(value).__name__}", path=path
        )
    return value or {}


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
