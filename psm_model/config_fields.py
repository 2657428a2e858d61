"""What a config field carries besides its type and default: the tags the jobs read off it, and the
range checks of the sections' `__post_init__` (`psm_model.config` and `psm_model.config_inference`
both use them, so they live below both).

The checks raise ValueError("key: ..."), which `psm_model.config_yaml` prefixes with the file and
the section.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# What the jobs ask of a key, said on the field itself (`tagged`, read back by `keys_tagged`):
# FREE_ON_RESUME: changes where or how fast a run trains, or how it reacts to failures, not what
#   it trains: a resumed run may change it freely (jobs/run_folder.py: check_resume_config)
# SWEEP_OWNED: set per trial by the sweep itself: a search space that set it would break resume
#   or the MLflow tree (jobs/sweep_space.py)
FREE_ON_RESUME = "free_on_resume"
SWEEP_OWNED = "sweep_owned"


def tagged(default: Any, *tags: str) -> Any:
    return dataclasses.field(default=default, metadata={tag: True for tag in tags})


def keys_tagged(tree: object, tag: str) -> frozenset[str]:
    """Every `section.key` of `tree` (a `psm_model.config.Config`) whose field carries `tag`."""
    return frozenset(
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(tree)  # type: ignore[arg-type]
        for f in dataclasses.fields(getattr(tree, section.name))
        if f.metadata.get(tag)
    )


def finite_floats(section: object) -> None:
    """NaN passes every `x <= 0` check (comparisons with NaN are false), so refuse it, and the
    infinities, before any range check."""
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name}: must be a finite number, got {value}")


def positive(section: object, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not value > 0:  # written so that NaN fails too
            raise ValueError(f"{name}: must be positive, got {value}")


def at_least(section: object, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not value >= minimum:
            raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def within(section: object, low: float, high: float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not low <= value <= high:
            raise ValueError(f"{name}: must be within [{low}, {high}], got {value}")
