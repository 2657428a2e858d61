"""The training runs of an MLflow experiment (or one sweep) side by side: what `psm compare`
(`jobs/compare.py`) prints and a sweep's end (`jobs/tune.py`) logs.

Columns: run, trial, status, the config values that differ between the runs, the last val AP / AP50
/ AP75 / AR, the best AP, epochs done and wall time. Sortable by any column (`sort_rows`), as a
table or CSV; `sweep_files` writes a sweep's table and pictures as the sweep logs them to its
parent run. The runs come from MLflow through `jobs.tracking.train_runs`.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path
from typing import Any

from jobs.tracking import train_runs
from psm_model.files import write_atomic

METRICS = {
    "AP": "val_AP",
    "AP50": "val_AP50",
    "AP75": "val_AP75",
    "AR": "val_AR",
    "best_AP": "best_AP",
    "epochs": "epochs_done",
}
# differ between any two runs by construction: not worth a column
PER_RUN_PARAMS = {"train.name", "train.storage_path", "train.mlflow_uri"}
HEAD = ["run", "trial", "status"]


def comparison(
    tracking_uri: str, experiment: str, sweep: str | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, the config keys whose values differ between the rows). Rows carry `run_id` too."""
    runs = train_runs(tracking_uri, experiment, sweep)
    keys = sorted({k for r in runs for k in r.data.params} - PER_RUN_PARAMS)
    differ = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    rows = []
    for r in runs:
        row: dict[str, Any] = {
            "run": r.info.run_name,
            "run_id": r.info.run_id,
            "trial": r.data.tags.get("psm.trial_id", ""),
            "status": r.info.status
            + (" (stopped early)" if r.data.tags.get("psm.stopped_early") else ""),
        }
        row |= {k: r.data.params.get(k, "") for k in differ}
        row |= {col: r.data.metrics.get(key, "") for col, key in METRICS.items()}
        if isinstance(row["epochs"], float):
            row["epochs"] = int(row["epochs"])
        end = r.info.end_time
        row["wall_s"] = round((end - r.info.start_time) / 1000) if end else ""
        rows.append(row)
    return rows, differ


def sort_rows(rows: list[dict], key: str, descending: bool = True) -> list[dict]:
    """Sorted by `key`, numbers as numbers; rows without a value last either way."""
    if rows and key not in rows[0]:
        raise KeyError(f"--sort {key!r}: not a column ({', '.join(rows[0])})")

    def value(row):
        v = row.get(key, "")
        try:
            return float(v)
        except (TypeError, ValueError):
            return v

    have = [r for r in rows if row_has(r, key)]
    return sorted(have, key=value, reverse=descending) + [r for r in rows if not row_has(r, key)]


def row_has(row: dict, key: str) -> bool:
    v = row.get(key, "")
    return v != "" and v is not None and not (isinstance(v, float) and math.isnan(v))


def columns(params: list[str]) -> list[str]:
    return [*HEAD, *params, *METRICS, "wall_s"]


def format_table(rows: list[dict], params: list[str]) -> str:
    cols = columns(params)
    cells = [[_cell(r.get(c, "")) for c in cols] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def write_csv(rows: list[dict], params: list[str], path: str | Path) -> None:
    """`path` "-" writes to stdout."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*columns(params), "run_id"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    if str(path) == "-":
        sys.stdout.write(out.getvalue())
    else:
        write_atomic(path, out.getvalue())


def sweep_files(uri: str, rows: list[dict], params: list[str], folder: str | Path) -> list[Path]:
    """A sweep's table (`trials.csv`, `trials.txt`, best AP first) and pictures
    (`jobs.sweep_pictures`) in `folder`; the files written."""
    from jobs.sweep_pictures import draw
    from jobs.tracking import metric_histories

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = sort_rows(rows, "best_AP")
    write_csv(rows, params, folder / "trials.csv")
    write_atomic(folder / "trials.txt", format_table(rows, params) + "\n")
    curves = metric_histories(uri, [r["run_id"] for r in rows], "val_AP")
    return [folder / "trials.csv", folder / "trials.txt", *draw(rows, params, curves, folder)]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return str(value)
