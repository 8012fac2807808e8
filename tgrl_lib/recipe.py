"""Recipes: YAML files (or text) and `--set` overrides -> validated config models; the one loader.

`load_config` reads a whole recipe or one step's section of it, applies `--set key=value` overrides and
explicit flags on top, and validates the result with the step's model. YAML is read safely and a key given
twice is refused, naming both lines. A validation error is one line naming the key, with the nearest valid
key for a misspelt one and the new place of a key that moved.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from tgrl_lib.config import PipelineConfig, StepConfig
from tgrl_lib.errors import TgrlError

T = TypeVar("T", bound=StepConfig)


# ------------------------------------------------------------------------------------ loading, --set
# keys that moved into the shared sampling / backend sub-models: old place -> new place
MOVED = {
    **{f"{step}.{key}": f"{step}.sampling.{key}" for step in ("generate", "train", "eval") for key in (
        "temperature", "max_new_tokens")},
    "generate.batch_size": "generate.sampling.batch_size",
    "eval.batch_size": "eval.sampling.batch_size",
    "train.rollout_batch_size": "train.sampling.batch_size",
    "generate.expert": "generate.backend.kind",
    "train.rollout_backend": "train.backend.kind",
    "train.vllm_gpu_memory_utilization": "train.backend.vllm.gpu_memory_utilization",
    "train.vllm_max_model_len": "train.backend.vllm.max_model_len",
    **{f"{step}.trust_remote_code": f"{step}.backend.trust_remote_code" for step in ("generate", "train")},
    **{f"generate.{key}": f"generate.backend.openai.{key}" for key in (
        "top_p", "base_url", "api_key_env", "concurrency", "max_retries", "timeout_s", "backoff_s",
        "max_backoff_s")},
}  # fmt: skip


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the sub-model that `loc` (without its last part) points into."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        sub = getattr(field, "annotation", None) if field else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return []
        model = sub
    return list(model.model_fields)


def _format_validation(err: ValidationError, source: str, model: type[BaseModel], prefix: str = "") -> str:
    """One line: source, the dotted key, what is wrong, and for an unknown key where it moved or the
    nearest valid one."""
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    hint = ""
    full = f"{prefix}{loc}"
    if full in MOVED:
        hint = f"; it moved to {MOVED[full]}"
    elif full.endswith(".backend") and first["type"] == "model_type":
        hint = f"; {loc} is a mapping now: {loc}: {{kind: {first.get('input')}}}"
    elif first["type"] == "extra_forbidden":
        near = difflib.get_close_matches(str(first["loc"][-1]), _fields_at(model, first["loc"]), n=1)
        hint = f"; did you mean {'.'.join([*map(str, first['loc'][:-1]), near[0]])}?" if near else ""
    return f"{source}: {loc + ': ' if loc else ''}{first['msg']}{more}{hint}"


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
    except (ValueError, RecursionError, yaml.YAMLError):
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw
        except (ValueError, RecursionError) as err:  # thousands of digits, thousands of brackets
            raise TgrlError(
                f"--set value {raw[:40]!r}... cannot be read ({str(err).split(';')[0]})"
            ) from None


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


def parse_yaml(text: str, source: Path | str = "<recipe>") -> dict[str, Any]:
    """A recipe's YAML text -> its mapping ({} when empty); errors name `source` and the line."""
    try:
        data = _load_recipe(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(err, "problem", None) or err
        raise TgrlError(f"invalid YAML ({reason})", path=source, line=line) from None
    except RecursionError:
        raise TgrlError("invalid YAML (nested too deeply)", path=source) from None
    except ValueError as err:  # e.g. an integer of thousands of digits
        raise TgrlError(f"invalid YAML value ({str(err).split(';')[0]})", path=source) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TgrlError("config must be a mapping of step sections", path=source)
    return data


def read_yaml(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TgrlError("config file not found", path=path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TgrlError("config is not UTF-8 text", path=path) from None
    return parse_yaml(text, path)


def load_config(
    path: Path | str | None,
    model: type[T] = PipelineConfig,
    overrides: list[str] | None = None,
    section: str | None = None,
    *,
    text: str | None = None,
    flags: dict[str, Any] | None = None,
) -> T:
    """The one loader: a recipe file (`path`) or its YAML `text` (neither: all defaults), or one step's
    `section` of it, validated by `model`, with `--set` `overrides` (`key=value`; inside a section
    `train.lr=...` and `lr=...` mean the same) and explicit `flags` (`{"sampling.temperature": 0.7}`,
    CLI options) on top. A file that holds only a section's keys is read as that section."""
    source = str(path) if path is not None else "recipe" if text is not None else "--set"
    if overrides and source != "--set":
        source += " with --set"
    data = read_yaml(path) if path is not None else parse_yaml(text, source) if text is not None else {}
    if section is not None:
        data = _section(data, section, path)
        overrides = [o.removeprefix(f"{section}.") for o in overrides or []]
    data = deep_merge(data, parse_overrides(overrides))
    data = deep_merge(data, parse_overrides([f"{k}={_as_text(v)}" for k, v in (flags or {}).items()]))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        prefix = f"{section}." if section else ""
        raise TgrlError(_format_validation(err, source, model, prefix)) from None


def _as_text(value: Any) -> str:
    """A flag value as the YAML scalar `--set` would parse back to the same value."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


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
