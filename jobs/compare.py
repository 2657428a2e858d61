"""`psm compare EXPERIMENT`: the training runs of an MLflow experiment (or one sweep) side by side.

Columns: run, trial, status, the config values that differ between the runs, the last val AP / AP50
/ AP75 / AR, the best AP, epochs done and wall time. Sortable by any column; `--csv` writes the
rows; `--sweep NAME --pictures DIR` writes the table and pictures the sweep logs to its parent
run (`sweep_files`).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path
from typing import Any

from jobs import command
from jobs.tracking import KIND_TAG, PARENT_TAG, literal
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
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        raise LookupError(f"{tracking_uri}: no MLflow experiment {experiment!r}")
    runs = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=f"tags.`{KIND_TAG}` = 'train'",
        output_format="list",
    )
    if sweep is not None:
        parents = mlflow.search_runs(
            experiment_names=[experiment],
            filter_string=(
                f"tags.`{KIND_TAG}` = 'sweep' and tags.`psm.run_name` = {literal(sweep)}"
            ),
            output_format="list",
        )
        if not parents:
            raise LookupError(f"{tracking_uri}: experiment {experiment!r} has no sweep {sweep!r}")
        ids = {p.info.run_id for p in parents}
        runs = [r for r in runs if r.data.tags.get(PARENT_TAG) in ids]

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Reads the training runs of EXPERIMENT back from MLflow and prints run, trial, "
        "status, the config values that differ, val AP/AP50/AP75/AR, best AP, epochs and wall "
        "time."
    )
    p.add_argument("experiment", help="MLflow experiment name (train.experiment)")
    p.add_argument("--sweep", help="only the trials of this sweep")
    p.add_argument("--sort", default="best_AP", help="column to sort by (default best_AP)")
    p.add_argument("--ascending", action="store_true", help="smallest first")
    p.add_argument("--csv", help="write the rows as CSV to this file ('-': stdout, no table)")
    p.add_argument(
        "--pictures",
        metavar="DIR",
        help="with --sweep: write the sweep's pictures (best-AP heatmap, val-AP curves) and "
        "table here, as the sweep logs them to its parent run",
    )
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, ./mlflow.db)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from jobs.storage import require_output_file
    from jobs.tracking import resolve_uri

    if args.pictures and not args.sweep:
        raise SystemExit("psm compare: error: --pictures needs --sweep NAME")
    if args.csv and args.csv != "-":  # checked before the MLflow queries
        require_output_file(args.csv, "--csv")
    uri = resolve_uri(args.tracking_uri or "")
    try:
        rows, params = comparison(uri, args.experiment, args.sweep)
        rows = sort_rows(rows, args.sort, descending=not args.ascending)
    except (LookupError, KeyError) as e:
        raise SystemExit(f"psm compare: error: {e.args[0]}") from e
    if args.csv:
        write_csv(rows, params, args.csv)
    if args.csv != "-":
        print(format_table(rows, params) if rows else "no training runs")
    if args.pictures:
        for path in sweep_files(uri, rows, params, args.pictures):
            print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.compare ARGS` is `psm compare ARGS`."""
    return command.job_main("jobs.compare", "psm compare", argv)


if __name__ == "__main__":
    sys.exit(main())
