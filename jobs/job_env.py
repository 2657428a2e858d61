"""`psm job-env [JSON]`: a `ray job submit --runtime-env-json` value that carries this checkout's
git commit to the job (`jobs.provenance.job_env`)."""

from __future__ import annotations

import argparse
import json
import sys

from jobs import command, provenance
from psm_model.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Prints a runtime env JSON for `ray job submit --runtime-env-json` that carries this "
        "checkout's git commit and dirty flag to the job (its copy of the working dir has no "
        ".git), so the job's MLflow runs name the commit they ran. Given a runtime env JSON, "
        "adds to it."
    )
    p.add_argument("runtime_env", nargs="?", default="{}", help="runtime env JSON to add to")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    try:
        given = json.loads(args.runtime_env)
        assert isinstance(given, dict)
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"psm job-env: {args.runtime_env!r} is not a JSON object") from e
    if not provenance.git_state():
        raise ConfigError(f"psm job-env: {provenance.ROOT} is not a git checkout")
    print(json.dumps(provenance.job_env(given)))


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.job_env [JSON]` is `psm job-env [JSON]`."""
    return command.job_main("jobs.job_env", "psm job-env", argv)


if __name__ == "__main__":
    sys.exit(main())
