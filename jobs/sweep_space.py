"""The search space of a `psm tune` sweep: a YAML file, checked against the config before any trial.

    searcher: grid            # grid | random | optuna
    num_samples: 1            # grid: repeats of the whole grid; random/optuna: trials
    max_concurrent_trials: 0  # 0: as many as the cluster's CPUs (and GPUs) hold
    sigma_units: heatmap      # heatmap | input: data.sigma in input pixels, / heatmap_stride
    asha: {grace_period: 1, reduction_factor: 2}   # early stopping on val AP; omit: none
    overrides: {train.epochs: 4, train.num_workers: 1}   # every trial, as `section.key=value`
    params:
      model.width: {grid: [16, 32]}                  # grid | choice: a list of values
      model.widths: {choice: [[16, 32, 48, 64], [32, 64, 96, 128]]}
      data.sigma: {uniform: [1.5, 3.0]}              # uniform | loguniform: [low, high]
      train.batch_size: {randint: [8, 32]}           # randint: [low, high], both included

Every parameter value (grid/choice values, range ends) is applied to the config and built, so an
unknown key, a negative sigma or a width the model cannot take fails here, naming the file and key.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from psm_model import config_fields
from psm_model.config import Config, ConfigError
from psm_model.config_yaml import parse_config, yaml_mapping

SEARCHERS = ("grid", "random", "optuna")
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
# set per trial by the sweep itself: the fields tagged so (psm_model/config_fields.py)
SWEEP_OWNED = tuple(sorted(config_fields.keys_tagged(Config(), config_fields.SWEEP_OWNED)))


@dataclass(frozen=True)
class Param:
    key: str  # config key, section.key
    kind: Literal["grid", "choice", "uniform", "loguniform", "randint"]
    values: tuple[Any, ...]  # grid/choice: the values; ranges: (low, high)


@dataclass(frozen=True)
class Asha:
    grace_period: int = 1  # epochs before a trial can be stopped
    reduction_factor: int = 2  # keep the top 1/rf at each rung


@dataclass(frozen=True)
class SweepSpace:
    params: tuple[Param, ...]
    searcher: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = 1
    max_concurrent_trials: int = 0
    sigma_units: Literal["heatmap", "input"] = "heatmap"
    asha: Asha | None = None
    overrides: tuple[str, ...] = ()
    source: str = "<space>"
    text: str = ""  # the file as given, logged with the sweep

    def trial_config(self, base: Config, params: dict[str, Any]) -> Config:
        """The config of one trial: base, the space's overrides, then the trial's values."""
        items = [*self.overrides, *(f"{k}={yaml_value(v)}" for k, v in params.items())]
        cfg = parse_config(base.to_yaml(), self.source, items)
        if self.sigma_units == "input":  # one physical spread whatever the trial's stride
            data = dataclasses.replace(cfg.data, sigma=cfg.data.sigma / cfg.model.heatmap_stride)
            cfg = dataclasses.replace(cfg, data=data)
        return cfg

    def swept_keys(self) -> list[str]:
        return [p.key for p in self.params]

    def num_trials(self) -> int:
        """Tune's count: num_samples times every grid combination (a searcher's samples when
        there is no grid)."""
        return self.num_samples * math.prod(len(p.values) for p in self.params if p.kind == "grid")


def load_space(path: str | Path, base: Config) -> SweepSpace:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the search space: {e.strerror}") from e
    return parse_space(text, base, str(path))


def parse_space(text: str, base: Config, source: str = "<space>") -> SweepSpace:
    """The space of a YAML text, validated against `base` (raises ConfigError)."""
    raw = yaml_mapping(text, source)
    known = {"searcher", "num_samples", "max_concurrent_trials", "sigma_units", "asha"}
    known |= {"overrides", "params"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{source}: {key}: unknown key (known: {', '.join(sorted(known))})")

    searcher = raw.get("searcher", "grid")
    if searcher not in SEARCHERS:
        raise ConfigError(f"{source}: searcher: {searcher!r} is not one of {SEARCHERS}")
    sigma_units = raw.get("sigma_units", "heatmap")
    if sigma_units not in ("heatmap", "input"):
        raise ConfigError(f"{source}: sigma_units: {sigma_units!r} is not heatmap or input")
    num_samples = _positive_int(raw.get("num_samples", 1), f"{source}: num_samples")
    concurrent = raw.get("max_concurrent_trials", 0)
    if isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 0:
        raise ConfigError(f"{source}: max_concurrent_trials: expected an integer >= 0")
    overrides = _overrides(raw.get("overrides") or {}, source)
    params = _params(raw.get("params"), source, searcher)
    asha = _asha(raw.get("asha"), source)

    space = SweepSpace(
        params, searcher, num_samples, concurrent, sigma_units, asha, overrides, source, text
    )
    configs = validate(space, base)
    if asha and asha.grace_period >= min(c.train.epochs for c in configs):
        raise ConfigError(
            f"{source}: asha.grace_period: {asha.grace_period} must be below train.epochs "
            f"({min(c.train.epochs for c in configs)}), or no trial can be stopped early"
        )
    return space


def validate(space: SweepSpace, base: Config) -> list[Config]:
    """Build the config for every candidate value of every parameter (the others at their first
    value), and every grid point when the grid is small; returns the configs built."""
    src = space.source
    try:
        fixed = parse_config(base.to_yaml(), src, space.overrides)
    except ConfigError as e:
        raise ConfigError(f"{src}: overrides: {_bare(e, src)}") from e
    keys = space.swept_keys()
    if "model.width" in keys and "model.widths" not in keys and fixed.model.widths is not None:
        raise ConfigError(
            f"{src}: params.model.width: has no effect while model.widths is set "
            f"({list(fixed.model.widths)}): sweep model.widths, or add model.widths: null to "
            "overrides"
        )
    first = {p.key: p.values[0] for p in space.params}
    configs = []
    for p in space.params:
        for value in p.values:  # every discrete value, or both ends of a range
            try:
                configs.append(space.trial_config(base, {**first, p.key: value}))
            except ConfigError as e:
                raise ConfigError(f"{src}: params.{p.key}: value {value!r}: {_bare(e, src)}") from e
    grid = [p for p in space.params if p.kind == "grid"]
    points = 1
    for p in grid:
        points *= len(p.values)
    if 1 < points <= 256:  # combinations can clash where single values do not
        for combo in itertools.product(*(p.values for p in grid)):
            values = {**first, **dict(zip((p.key for p in grid), combo, strict=True))}
            try:
                configs.append(space.trial_config(base, values))
            except ConfigError as e:
                raise ConfigError(f"{src}: params: grid point {values}: {_bare(e, src)}") from e
    return configs


def _bare(error: ConfigError, source: str) -> str:
    """The config error without its source prefix (the caller names the space file)."""
    return str(error).removeprefix(f"{source} + overrides: ")


def _params(raw: Any, source: str, searcher: str) -> tuple[Param, ...]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: params: expected a mapping of config keys to distributions")
    params = []
    for key, dist in raw.items():
        where = f"{source}: params.{key}"
        if key in SWEEP_OWNED:
            raise ConfigError(f"{where}: set by the sweep itself, not a search dimension")
        if "." not in str(key):
            raise ConfigError(f"{where}: expected a config key section.key (e.g. data.sigma)")
        if not isinstance(dist, dict) or len(dist) != 1:
            raise ConfigError(f"{where}: expected one of {{{', '.join(KINDS)}: ...}}")
        ((kind, values),) = dist.items()
        if kind not in KINDS:
            raise ConfigError(f"{where}: {kind!r} is not one of {KINDS}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{kind}: expected a non-empty list")
        if kind in ("uniform", "loguniform", "randint"):
            values = _range(kind, values, f"{where}.{kind}")
        if searcher == "grid" and kind != "grid":
            raise ConfigError(f"{where}: searcher grid takes only grid: [...] values")
        if searcher == "optuna" and kind == "grid":
            raise ConfigError(f"{where}: searcher optuna samples; use choice: [...] for a list")
        params.append(Param(str(key), kind, tuple(values)))
    return tuple(params)


def _range(kind: str, values: list, where: str) -> list:
    if len(values) != 2 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        raise ConfigError(f"{where}: expected [low, high] numbers, got {values!r}")
    low, high = values
    if not low < high:
        raise ConfigError(f"{where}: low {low} must be below high {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: low must be positive for a log scale, got {low}")
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"{where}: expected integer ends, got {values!r}")
    return values


def _asha(raw: Any, source: str) -> Asha | None:
    if raw is None or raw is False:
        return None
    if raw is True:
        return Asha()
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: asha: expected a mapping (grace_period, reduction_factor)")
    for key in raw:
        if key not in ("grace_period", "reduction_factor"):
            raise ConfigError(f"{source}: asha.{key}: unknown key")
    asha = Asha(
        _positive_int(raw.get("grace_period", 1), f"{source}: asha.grace_period"),
        _positive_int(raw.get("reduction_factor", 2), f"{source}: asha.reduction_factor"),
    )
    if asha.reduction_factor < 2:
        raise ConfigError(f"{source}: asha.reduction_factor: must be at least 2")
    return asha


def _overrides(raw: Any, source: str) -> tuple[str, ...]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: overrides: expected a mapping of section.key: value")
    for key in raw:
        if key in SWEEP_OWNED:
            raise ConfigError(f"{source}: overrides.{key}: set by the sweep itself")
    return tuple(f"{k}={yaml_value(v)}" for k, v in raw.items())


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
    return value


def yaml_value(value: Any) -> str:
    """A value as override text (`[16, 32, 48, 64]`, `null`, `1.5`)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
