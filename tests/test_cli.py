import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _subcommands(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _subcommands(sub, (*prefix, name))


@pytest.mark.parametrize("command", list(_subcommands(build_parser())), ids=" ".join)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: psm " + " ".join(command) in capsys.readouterr().out


def test_console_script_is_installed():
    # the `psm` entry point from pyproject.toml, next to this interpreter
    psm = Path(sys.executable).with_name("psm")
    out = subprocess.run([str(psm), "--help"], capture_output=True, text=True, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert "model-summary" in out.stdout and "bench" in out.stdout


def test_model_summary_prints_all_variants(capsys):
    assert main(["model-summary", TINY]) == 0
    out = capsys.readouterr().out
    rows = [
        line for line in out.splitlines() if line.startswith("| hrnet") or line.startswith("| psm")
    ]
    assert len(rows) == 4
    configured = [r for r in rows if " * |" in r]
    assert len(configured) == 1 and configured[0].startswith("| psm W8 128x96 stride 2")
    assert "| 1x17x64x48 |" in configured[0]  # heatmaps at half the 128x96 input
    assert any("stride 4" in r and "| 1x17x32x24 |" in r for r in rows)


def test_bad_config_is_a_clean_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  fusion: upsample\n")
    assert main(["model-summary", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"psm: error: {bad}: model.fusion: 'upsample' is not one of" in err


def test_bench_model_runs_on_cpu(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    args = ["bench", "model", TINY, "--threads", "1", "--batches", "1", "--repeats", "2"]
    assert main([*args, "--json", str(out_json)]) == 0
    import json

    res = json.loads(out_json.read_text())
    models = [r["model"] for r in res["cpu"]]
    assert models == ["hrnet W8 128x96 stride 4", "psm W8 128x96 stride 2"]
    assert all(r["seconds"] > 0 for r in res["cpu"])


def test_overrides_may_follow_flags():
    from jobs.cli import parse_args

    args = parse_args(
        ["eval", TINY, "--oracle", "data.root=/x", "--dets", "d.json", "eval.workers=2"]
    )
    assert args.oracle and args.dets == "d.json"
    assert args.overrides == ["data.root=/x", "eval.workers=2"]
    args = parse_args(["infer", TINY, "model.width=16", "--checkpoint", "c", "data.root=/d"])
    assert args.overrides == ["model.width=16", "data.root=/d"] and args.checkpoint == "c"
    with pytest.raises(SystemExit):  # anything else is still an error
        parse_args(["eval", TINY, "--oracle", "bogus"])
