"""`psm bench infer` end to end on a few images: the figures it reports are consistent with each
other (the bench is what issue 15's goal is measured with, so it must keep running)."""

import json

import pytest

from benchmarks.infer import bench_infer
from psm_model.config import load_config

pytestmark = pytest.mark.slow


def test_bench_infer_reports_the_job_against_the_pose_model(ray_local, tmp_path, capsys):
    cfg = load_config(None, ["model.width=8", "model.input_size=[64,64]", "eval.batch_size=4"])
    out = tmp_path / "bench.json"
    r = bench_infer(cfg, 40, (120, 160), str(out), repeats=1)  # 2 blocks of 32: running rates
    assert json.loads(out.read_text()) == r
    assert r["persons"] >= 24  # one figure per image, plus the decoys the detector keeps
    for runtime in ("torch", "onnxruntime"):
        for graph in ("job", "boxes_job"):  # detector + pose (psm infer), given boxes (psm eval)
            job = r[f"{graph}_{runtime}_persons_s"]
            running = r[f"{graph}_{runtime}_running_persons_s"]
            assert 0 < job and 0 < running and r[f"{graph}_{runtime}_start_s"] > 0
            assert r[f"{graph}_over_pose_only_{runtime}"] == pytest.approx(
                job / r[f"pose_only_{runtime}_persons_s"]
            )
        # the goal's reference is the faster of the two pose-alone measures
        before, after = (
            r[f"pose_only_{runtime}_before_persons_s"],
            r[f"pose_only_{runtime}_after_persons_s"],
        )
        assert r[f"pose_only_{runtime}_persons_s"] == max(before, after) > 0
    assert r["pose_device"] == "cpu"
    assert "boxes job torch" in capsys.readouterr().out
