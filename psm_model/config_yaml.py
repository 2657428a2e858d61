"""YAML text and `section.key=value` overrides -> the typed `Config` (psm_model.config): the one
door a config enters by, for files, overrides, the CLI's shorthand flags and the config.yaml
saved in a checkpoint. Values are type-checked against the fields' annotations; every error
names the file (or "override") and the dotted key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from psm_model.config import Config, ConfigError

log = logging.getLogger(__name__)

# keys that moved: a config (or a checkpoint's config.yaml) with the old key still loads, with a
# warning naming the new one; giving both is an error
MOVED_KEYS = {
    "train.data_cpus": "data.cpus_per_task",
    "train.data_chunk_images": "data.chunk_images",
    "train.channels_last": "data.channels_last",
}
# the shorthand flags of `psm eval` / `psm infer` / `psm serve`: each stands for these overrides
# ({} = its value)
FLAG_OVERRIDES = {
    "eval": {"dets": ("eval.detections={}",)},
    "infer": {"dets": ("infer.boxes=file", "infer.detections={}"), "output": ("infer.output={}",)},
    "serve": {"port": ("serve.port={}",)},
}


def flag_overrides(job: str, **flags: str | None) -> list[str]:
    """The `section.key=value` overrides a job's given flags stand for, e.g. `psm infer --dets X`
    -> infer.boxes=file infer.detections=X. Placed after the user's overrides, flags win."""
    # the value as a YAML string: a path like `123` or `a #b.json` stays that text
    return [
        item.format(json.dumps(value))
        for flag, value in flags.items()
        if value
        for item in FLAG_OVERRIDES[job][flag]
    ]


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then `section.key=value` overrides, type-checked."""
    text = ""
    if path:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror}") from e
    return parse_config(text, str(path) if path else "<defaults>", overrides)


def yaml_mapping(text: str, source: str, expected: str = "a mapping") -> dict:
    """The top-level mapping of a YAML text (empty text: {}); ConfigError naming `source`."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected {expected}, got {type(raw).__name__}")
    return raw


def parse_config(text: str, source: str = "<text>", overrides: typing.Sequence[str] = ()) -> Config:
    """A config from YAML text (e.g. the config.yaml saved in a checkpoint), then overrides."""
    tree: dict[str, dict[str, Any]] = {}
    raw = yaml_mapping(text, source, "a mapping of sections")
    for section, values in raw.items():
        _section_type(section, source)
        if not isinstance(values, dict):
            raise ConfigError(
                f"{source}: {section}: expected a mapping, got {type(values).__name__}"
            )
        tree.setdefault(section, {}).update(values)
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        _section_type(section, "override")
        target = tree.setdefault(section, {})
        *parents, leaf = name.split(".")
        for parent in parents:  # a nested section: infer.detector.model=...
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r}: {section}.{parent} is not a section")
        target[leaf] = yaml.safe_load(value) if value.strip() else ""
    source = f"{source}{' + overrides' if overrides else ''}"
    _move_keys(tree, source)
    return _build(tree, source)


def _move_keys(tree: dict[str, dict[str, Any]], source: str) -> None:
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        if old_key not in tree.get(old_section, {}):
            continue
        value = tree[old_section].pop(old_key)
        if new_key in tree.get(new_section, {}):
            raise ConfigError(f"{source}: {old}: moved to {new}, which is set too: keep only {new}")
        log.warning("%s: %s is now %s: read as %s=%s", source, old, new, new, value)
        tree.setdefault(new_section, {})[new_key] = value


def _section_type(section: str, source: str) -> type:
    types_ = {f.name: f.type for f in dataclasses.fields(Config)}
    if section not in types_:
        raise ConfigError(f"{source}: {section}: unknown section (known: {', '.join(types_)})")
    return typing.get_type_hints(Config)[section]


def _build(tree: dict[str, dict[str, Any]], source: str) -> Config:
    sections = {}
    for section, values in tree.items():
        cls = _section_type(section, source)
        sections[section] = _section(cls, values, f"{source}: {section}")
    return Config(**sections)


def _section(cls: type, values: dict[str, Any], where: str) -> Any:
    """One (possibly nested) section's dataclass from its mapping; `where` = "source: a.b"."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(hints)})")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # raised by __post_init__ checks, which name the key
        raise ConfigError(f"{where}.{e}") from e


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):  # a nested section (infer.detector)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _section(tp, value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args or type(value) is not type(args[args.index(value)]):
            raise ConfigError(f"{where}: {value!r} is not one of {args}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(
            _coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads `1e-3` (no dot) as a string; accept any text that is a number
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported config type {tp}")  # a bug in this module, not in input
