"""benchmarks/gpu_run.sh, the one GPU call of issue 28: what it reads between its parts
(benchmarks/gpu_run.py), its budget, and a dry run of the whole script on this CPU with the tiny
model and the venv's packages (the bundle's install is the device's step, tested in
test_device_bundle.py)."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import gpu_run
from benchmarks.train_start import LEAN_ENV
from psm_model.config_yaml import load_config
from tests.local_cluster import QUIET_RAY_ENV, SHALLOW

REPO = Path(__file__).resolve().parents[1]
TINY = "psm W8 128x96 stride 2"  # describe() of configs/tiny.yaml's model
OUTPUTS = {"environment.json", "ladder.json", "train.json", "data.json", "infer.json"}
OUTPUTS |= {"summary.md", "logs.tar.gz"}  # the device tool brings back 8 files at most


def _rung(model: str, images_per_s: float, first_step_s: float, compile: bool = False) -> dict:
    return {
        "model": model,
        "images_per_s": images_per_s,
        "first_step_s": first_step_s,
        "batch": 128,
        "amp": "bf16",
        "channels_last": True,
        "compile": compile,
        "compile_scope": "blocks" if compile else None,
        "compile_mode": "reduce-overhead" if compile else None,
        "fused_optimizer": True,
    }


def test_the_fastest_rung_of_the_model_whose_compilation_fits_the_training_part():
    rungs = {
        "hrnet_fp32": _rung("hrnet W48", 900.0, 2.0),  # another model: the baseline
        "fused": _rung(TINY, 400.0, 3.0),
        "blocks_graphs": _rung(TINY, 600.0, 35.0, compile=True),
        "model_graphs": _rung(TINY, 700.0, 120.0, compile=True),  # compiles too long
    }
    assert gpu_run.best_rung(rungs, TINY, max_first_step_s=40) == "blocks_graphs"
    assert gpu_run.best_rung(rungs, TINY, max_first_step_s=10) == "fused"
    assert gpu_run.best_rung({}, TINY, 40) is None
    assert gpu_run.rung_overrides(rungs["blocks_graphs"]) == [
        "train.batch_size=128",
        "train.amp=bf16",
        "data.channels_last=true",
        "train.compile=true",
        "train.compile_scope=blocks",
        "train.compile_mode=reduce-overhead",
        "train.fused_optimizer=true",
    ]
    assert "train.compile_scope" not in " ".join(gpu_run.rung_overrides(rungs["fused"]))


def _gpu_run(out: Path, work: Path, **env: str) -> subprocess.CompletedProcess:
    # configs/tiny.yaml with the e2e tests' shallow net: the script takes a config file
    shallow = out.parent / "tiny_shallow.yaml"
    shallow.parent.mkdir(parents=True, exist_ok=True)
    shallow.write_text(load_config(REPO / "configs" / "tiny.yaml", [SHALLOW]).to_yaml())
    tiny = {
        "BUNDLE": "",  # the venv's packages
        "PY": sys.executable,
        "WORK": str(work),
        "CONFIG": str(shallow),
        "BASE": str(shallow),
        "BATCH": "2",
        "AMP": "none",
        "CL": "false",
        "STEPS": "1",
        "WARMUP": "1",
        "RUNS": "fused",
        "TRAIN_IMAGES": "10",
        "EPOCHS": "1",
        "CHUNK": "32",
        "SIZE": "128x96",
        "DATA_WORKERS": "1",
        "DATA_MIN_SAMPLES": "16",
        # both runtimes; 40 small images: 2 blocks of 32, so the rates once running are figures
        "INFER_IMAGES": "40",
        "DETECTORS": "1",
        "RUNTIMES": "torch onnxruntime",
        "INFER_ARGS": "--size 120x160 eval.batch_size=4",
    }
    return subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_run.sh"), str(out)],
        env=os.environ | LEAN_ENV | QUIET_RAY_ENV | tiny | env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_budget_too_short_for_any_part_skips_them_all_and_still_writes_its_files(tmp_path):
    done = _gpu_run(tmp_path / "out", tmp_path / "work", BUDGET="30")
    assert done.returncode == 0, done.stdout + done.stderr
    for part in ("ladder", "train", "data", "infer"):
        assert f"== {part}: skipped" in done.stdout
    assert {p.name for p in (tmp_path / "out").iterdir()} == OUTPUTS - {"data.json", "infer.json"}
    assert json.loads((tmp_path / "out" / "ladder.json").read_text()) == {"best": None, "rungs": {}}
    assert "error" in json.loads((tmp_path / "out" / "train.json").read_text())


@pytest.mark.slow
def test_a_dry_run_of_the_whole_script_gives_every_parts_figures(tmp_path):
    out = tmp_path / "out"
    # the device's part timeouts are for the device: here each part gets what a loaded 2-core
    # machine needs (the whole run took 144-411 s at load averages of 7-18)
    roomy = {f"{part}_S": "300" for part in ("INSTALL", "LADDER", "TRAIN", "DATA", "INFER")}
    done = _gpu_run(out, tmp_path / "work", BUDGET="1500", **roomy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpu_run: done" in done.stdout and "skipped" not in done.stdout, done.stdout
    status = dict(re.findall(r"== (\w+): rc=(\d+)", done.stdout))
    assert [status.get(part) for part in ("ladder", "train", "data", "infer")] == ["0"] * 4, (
        done.stdout
    )
    assert {p.name for p in out.iterdir()} == OUTPUTS

    def read(name: str) -> dict:
        return json.loads((out / f"{name}.json").read_text())

    assert read("environment")["packages"]["ray"]
    ladder = read("ladder")
    assert ladder["best"] == "fused" and ladder["rungs"]["fused"]["batch"] == 2
    train = read("train")
    assert train["run_status"] == "FINISHED" and len(train["epochs"]) == 1
    assert 0 <= train["data_wait_frac"] <= 1 and train["data_samples_per_s"] > 0
    assert train["job_over_model_only"] == pytest.approx(
        train["samples_per_s"] / ladder["rungs"]["fused"]["images_per_s"]
    )
    (size,) = read("data")["datasets"][0]["sizes"].values()
    assert [r["workers"] for r in size["ray"]] == [1] and size["ray"][0]["samples_per_s"] > 0
    # `psm bench infer` (what issue 15's goal is measured with): its figures agree
    infer = read("infer")
    assert infer["runtimes"] == ["torch", "onnxruntime"] and infer["pose_device"] == "cpu"
    assert infer["persons"] >= 24  # one figure per image, plus the decoys the detector keeps
    for runtime in infer["runtimes"]:
        for graph in ("job", "boxes_job"):  # detector + pose (psm infer), given boxes (psm eval)
            job = infer[f"{graph}_{runtime}_persons_s"]
            running = infer[f"{graph}_{runtime}_running_persons_s"]
            assert 0 < job and 0 < running and infer[f"{graph}_{runtime}_start_s"] > 0
            assert infer[f"{graph}_over_pose_only_{runtime}"] == pytest.approx(
                job / infer[f"pose_only_{runtime}_persons_s"]
            )
        # the goal's reference is the faster of the two pose-alone measures
        before = infer[f"pose_only_{runtime}_before_persons_s"]
        after = infer[f"pose_only_{runtime}_after_persons_s"]
        assert infer[f"pose_only_{runtime}_persons_s"] == max(before, after) > 0
    assert "| train | data_wait_frac |" in (out / "summary.md").read_text()
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {Path(name).name for name in tar.getnames()}
        assert {"ladder.log", "train.log", "data.log", "infer.log", "make_data.log"} <= logs
        (infer_log,) = [m for m in tar.getmembers() if m.name.endswith("infer.log")]
        assert b"boxes job onnxruntime" in tar.extractfile(infer_log).read()  # the table
