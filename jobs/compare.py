"""`psm compare EXPERIMENT`: the training runs of an MLflow experiment (or one sweep) side by side
(`jobs/comparison.py`)."""

from __future__ import annotations

import argparse
import sys

from jobs import command
from jobs.comparison import comparison, format_table, sort_rows, sweep_files, write_csv


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
