"""A sweep's pictures and table, logged to its MLflow parent run and written by `psm compare
--sweep NAME --pictures DIR`, from the same rows (`jobs.comparison.comparison`):

- `best_ap_heatmap.png`: best val AP over width x sigma (the mission's grid), or over the two
  parameters whose values move the AP most, the value printed in each cell;
- `val_ap_curves.png`: every trial's val AP per epoch on one axis, ASHA's stops marked;
- `trials.csv` / `trials.txt`: the comparison table, best AP first (`jobs.comparison`).

Trials are named by the parameters that differ between them (`w48 σ2.5`), here and on the
console lines of a sweep.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

WIDTH_KEYS = ("model.width", "model.widths")
SIGMA_KEY = "data.sigma"
# axis titles: the key and its unit (a trial's sigma is in heatmap pixels, whatever the space's
# sigma_units: `SweepSpace.trial_config` divides input pixels by the stride)
UNITS = {
    "model.width": "model.width: base width C (channels; branches C, 2C, 4C, 8C)",
    "model.widths": "model.widths: channels of the four branches",
    "data.sigma": "data.sigma: Gaussian sigma (heatmap pixels)",
    "train.lr": "train.lr: learning rate",
}
RANK = "best_AP"


def _value(text: Any) -> Any:
    """A param as MLflow holds it (text) back as a number or list where it is one."""
    if isinstance(text, str):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            return text
    return text


def short(key: str, value: Any) -> str:
    """One parameter in a few characters: `w48`, `w16/32/48/64`, `σ2.5`, `lr 0.001`."""
    v = _value(value)
    if key == "model.width":
        return f"w{v}"
    if key == "model.widths":
        return "w" + "/".join(str(x) for x in v) if isinstance(v, list) else f"w{v}"
    number = f"{v:.3g}" if isinstance(v, float) else str(v)
    if key == SIGMA_KEY:
        return f"σ{number}"
    if key == "train.lr":
        return f"lr {number}"
    return f"{key.rsplit('.', 1)[-1]}={number}"


def trial_label(params: dict[str, Any]) -> str:
    """`w48 σ2.5`: a trial by the values of the parameters that differ between trials."""
    return " ".join(short(k, v) for k, v in params.items())


def _stopped(row: dict) -> bool:
    return "stopped" in str(row.get("status", ""))


def _ranked(rows: list[dict]) -> list[dict]:
    return [r for r in rows if isinstance(r.get(RANK), float) and not math.isnan(r[RANK])]


def _importance(rows: list[dict], key: str) -> float:
    """How far the mean best AP moves between the values of `key` (0 for a single value)."""
    groups: dict[str, list[float]] = {}
    for r in _ranked(rows):
        groups.setdefault(str(r.get(key, "")), []).append(r[RANK])
    means = [sum(v) / len(v) for v in groups.values()]
    return max(means) - min(means) if len(means) > 1 else 0.0


def heatmap_axes(rows: list[dict], keys: list[str]) -> tuple[str, str | None]:
    """(x, y) keys of the heatmap: a width key and sigma when both vary, else the two that move
    the AP most (y None: a single row)."""
    width = next((k for k in WIDTH_KEYS if k in keys), None)
    if width and SIGMA_KEY in keys:
        return width, SIGMA_KEY
    ordered = sorted(keys, key=lambda k: -_importance(rows, k))
    if not ordered:
        return "run", None
    return ordered[0], (ordered[1] if len(ordered) > 1 else None)


def _sorted_values(rows: list[dict], key: str | None) -> list[str]:
    def order(text: str):
        v = _value(text)
        return (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, text)

    return sorted({str(r.get(key, "")) for r in rows}, key=order) if key else [""]


def heatmap_grid(
    rows: list[dict], x: str, y: str | None
) -> tuple[list[str], list[str], list[list[float]], list[list[str]]]:
    """(x values, y values, best AP per cell [y][x] (NaN: no trial), a note per cell): the best
    of the cell's trials, noted `stopped` when ASHA stopped it and `best of n` for several."""
    xs, ys = _sorted_values(rows, x), _sorted_values(rows, y)
    grid = [[math.nan] * len(xs) for _ in ys]
    notes = [[""] * len(xs) for _ in ys]
    count = [[0] * len(xs) for _ in ys]
    for r in _ranked(rows):
        i, j = ys.index(str(r.get(y, ""))) if y else 0, xs.index(str(r.get(x, "")))
        count[i][j] += 1
        if math.isnan(grid[i][j]) or r[RANK] > grid[i][j]:
            grid[i][j] = r[RANK]
            notes[i][j] = "stopped" if _stopped(r) else ""
    for i, j in ((i, j) for i in range(len(ys)) for j in range(len(xs))):
        if count[i][j] > 1:
            notes[i][j] = f"best of {count[i][j]}" + (", stopped" if notes[i][j] else "")
    return xs, ys, grid, notes


def draw(
    rows: list[dict], params: list[str], curves: dict[str, list[tuple[int, float]]], folder: Path
) -> list[Path]:
    """The heatmap and the curves (`curves`: run id -> [(epoch index, val AP)]) in `folder`."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes
    heatmap, lines = folder / "best_ap_heatmap.png", folder / "val_ap_curves.png"
    _heatmap(rows, params, heatmap)
    _curves(rows, params, curves, lines)
    return [heatmap, lines]


def _heatmap(rows: list[dict], params: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    x, y = heatmap_axes(rows, params)
    xs, ys, grid, notes = heatmap_grid(rows, x, y)
    values = np.array(grid, dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 * len(xs) + 2.6, 1.0 * len(ys) + 1.8))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    image.cmap.set_bad("#dddddd")
    top = np.nanmax(values) if np.isfinite(values).any() else 0.0
    for (i, j), v in np.ndenumerate(values):
        text = "no trial" if math.isnan(v) else f"{v:.4f}"
        text += f"\n{notes[i][j]}" if notes[i][j] else ""
        light = not math.isnan(v) and v < 0.6 * top  # white on the dark end of viridis
        ax.text(j, i, text, ha="center", va="center", fontsize=9, color="w" if light else "k")
    ax.set_xticks(range(len(xs)), [short(x, v) for v in xs] if x in UNITS else xs)
    ax.set_xlabel(UNITS.get(x, x))
    ax.set_yticks(range(len(ys)), [short(y, v) for v in ys] if y in UNITS else ys)
    ax.set_ylabel(UNITS.get(y, y) if y else "")
    ax.set_title("best val AP of each trial (COCO keypoint AP)", fontsize=10)
    fig.colorbar(image, ax=ax, label="best val AP")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curves(
    rows: list[dict], params: list[str], curves: dict[str, list[tuple[int, float]]], path: Path
) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ranked = {r["run_id"] for r in _ranked(rows)}
    for r in sorted(rows, key=lambda r: -r[RANK] if r["run_id"] in ranked else 1.0):  # best first
        points = curves.get(r["run_id"], [])
        if not points:
            continue
        epochs = [step + 1 for step, _ in points]
        label = trial_label({p: r.get(p, "") for p in params}) or r["run"]
        label += " (stopped)" if _stopped(r) else ""
        (line,) = ax.plot(epochs, [v for _, v in points], marker="o", ms=3, label=label)
        if _stopped(r):  # where ASHA stopped it
            ax.plot(epochs[-1], points[-1][1], "x", ms=10, mew=2, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("val AP (COCO keypoint AP)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("val AP of every trial per epoch; x: stopped early by ASHA", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
