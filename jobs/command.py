"""What every command shares: the CONFIG + `section.key=value` arguments, parsing them in any order
with the flags, logging, and the one-line `psm: error: ...` for a PsmError.

`jobs/cli.py` (the `psm` dispatcher) and each job's `main` (`python -m jobs.X`, what `ray job
submit` runs) both go through `run`. Light imports only: `psm --help` must stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from collections.abc import Sequence

OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)+=.*", re.S)  # section[.sub].key=value


def add_config_arguments(p: argparse.ArgumentParser, default: str = "") -> None:
    """CONFIG and its overrides; `default` names what a command without CONFIG uses."""
    if default:
        p.add_argument("config", nargs="?", default=None, help=f"config (default: {default})")
    else:
        p.add_argument("config", help="YAML config file (e.g. configs/psm_w48_384x288.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def add_verbose_argument(p: argparse.ArgumentParser, default=False) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="debug logging, and Ray's and pycocotools' output on the console",
    )


def load(args: argparse.Namespace, *flag_overrides: str):
    """The command's config: CONFIG with its overrides, then those its flags stand for
    (`psm_model.config_yaml.flag_overrides`: a flag wins over the same key given as an override)."""
    from psm_model.config_yaml import load_config

    return load_config(args.config, [*args.overrides, *flag_overrides])


def size_hw(text: str) -> tuple[int, int]:
    """An argparse type: HEIGHTxWIDTH."""
    h, sep, w = text.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit() or int(h) <= 0 or int(w) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HEIGHTxWIDTH, e.g. 384x288")
    return int(h), int(w)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags and `section.key=value` overrides in any order (`psm eval C --oracle data.root=X`):
    argparse stops filling the overrides at the first flag, so the rest are gathered here."""
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if not OVERRIDE.fullmatch(a)]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _redact_record(record: logging.LogRecord) -> bool:
    """Log lines carry URIs: mask their credentials (psm_model.errors.redact_secrets)."""
    from psm_model.errors import redact_secrets

    record.msg, record.args = redact_secrets(record.getMessage()), None
    return True


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_redact_record)


def run(args: argparse.Namespace, name: str) -> int:
    """Run the parsed command `name`: a PsmError (bad config, data, checkpoint, ...) is one line
    on stderr and exit code 2; any other exception keeps its traceback."""
    from jobs import console
    from psm_model.errors import PsmError

    setup_logging(args.verbose)
    try:
        with console.quiet(console.log_file(args.verbose, name)):
            args.func(args)
    except PsmError as e:
        from psm_model.errors import redact_secrets

        print(f"psm: error: {redact_secrets(str(e))}", file=sys.stderr)  # URIs may carry keys
        return 2
    return 0


def job_main(module: str, prog: str, argv: Sequence[str] | None = None) -> int:
    """`python -m jobs.X ARGS` = `psm X ARGS`. The parser comes from the imported module, not from
    `__main__`: Ray pickles functions of `__main__` by value, with every global they touch."""
    parser = argparse.ArgumentParser(prog=prog)
    add_verbose_argument(parser)
    importlib.import_module(module).add_arguments(parser)
    return run(parse(parser, sys.argv[1:] if argv is None else argv), prog.split()[-1])
