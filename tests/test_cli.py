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
    # nested sections too: the README's detector command puts them after --checkpoint
    args = parse_args(["infer", TINY, "--checkpoint", "c", "infer.detector.model=d.onnx"])
    assert args.overrides == ["infer.detector.model=d.onnx"]
    with pytest.raises(SystemExit):  # anything else is still an error
        parse_args(["eval", TINY, "--oracle", "bogus"])


def test_eval_takes_overrides_after_its_flags(synthetic_root, tmp_path):
    # the order most users type: CONFIG, flags, then overrides (argparse alone refuses it)
    mlflow_uri = f"train.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["eval", TINY, "--oracle", f"data.root={synthetic_root}", mlflow_uri]) == 0


def test_a_job_main_is_the_cli_command(tmp_path, capsys):
    # `python -m jobs.evaluate ARGS` (ray job submit) = `psm eval ARGS`: same arguments in any
    # order, and a PsmError is one line with exit code 2
    from jobs.evaluate import main as eval_main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  fusion: upsample\n")
    assert eval_main([str(bad), "--oracle", "data.root=/nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"psm: error: {bad} + overrides: model.fusion:")
    assert err.count("\n") == 1


@pytest.mark.parametrize("module", ["train", "evaluate", "infer", "tune"])
def test_python_m_job_help(module):
    out = subprocess.run(
        [sys.executable, "-m", f"jobs.{module}", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert "section.key=value" in out.stdout


def test_no_job_module_imports_the_cli():
    # the CLI imports the job modules (lazily); they share jobs.command, never jobs.cli
    sources = [p for p in (ROOT / "jobs").glob("*.py") if p.name != "cli.py"]
    sources += list((ROOT / "benchmarks").glob("*.py"))
    assert [p.name for p in sources if "jobs.cli" in p.read_text()] == []


def test_help_imports_no_job_module():
    # `psm --help` stays fast: the parser imports only the module of the command it runs
    code = (
        "import sys; from jobs.cli import build_parser; build_parser(); print(sorted(sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    loaded = out.stdout
    assert "'jobs.cli'" in loaded
    assert not any(
        f"'{m}'" in loaded
        for m in ("ray", "torch", "jobs.train", "jobs.training", "jobs.train_loop", "mlflow")
    )


def test_a_training_job_with_a_bad_config_ends_before_torch_or_ray_loads():
    # what `ray job submit` runs: the config's error in about a second, not after 2.5 s of imports
    code = (
        "import sys; from jobs.train import main; rc = main(['configs/demo.yaml', "
        "'model.fusion=pms']); heavy = {'torch', 'ray', 'jobs.training'}; "
        "print(rc, sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split(None, 1) == ["2", "[]\n"]
    assert "model.fusion: 'pms' is not one of ('hrnet', 'psm')" in out.stderr
