"""`psm eval` end to end on the local Ray: a state_dict file, a training checkpoint folder, an
official HRNet .pth, and the GT oracle; metrics printed and logged to MLflow. The model runs on
Ray Data actors and must score as it does in process (validation inside training)."""

import hashlib
import json
import types
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from official_reference import official_state_dict

from jobs.cli import main
from jobs.tracking import Tracker
from pipelines.validate import evaluate_model
from psm_model.checkpoint import TrainState, save_checkpoint
from psm_model.coco_eval import METRIC_NAMES
from psm_model.config_yaml import load_config
from psm_model.hrnet import build_model
from psm_model.recipe import EvalRecipe, ValSet

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def _args(root, tmp_path):
    return [f"data.root={root}", f"train.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}"]


def _last_run(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["psm-pose"], order_by=["start_time DESC"]).iloc[0]


def test_eval_a_state_dict_file(ray_local, synthetic_root, tmp_path, capsys):
    cfg = load_config(TINY, _args(synthetic_root, tmp_path))
    torch.save(build_model(cfg.model).state_dict(), tmp_path / "model.pt")
    results = tmp_path / "results.json"
    args = [
        "eval",
        TINY,
        *_args(synthetic_root, tmp_path),
        "--checkpoint",
        str(tmp_path / "model.pt"),
    ]
    # a URI, as s3://... on a cluster: written there (it once became a local "file:/..." path)
    assert main([*args, "--results", f"file://{results}"]) == 0
    out = capsys.readouterr().out
    assert "model evaluation on" in out and "| AP | AP50 |" in out
    assert json.loads(results.read_text()) and not Path("file:").exists()
    run = _last_run(tmp_path)
    assert run["params.eval.kind"] == "model" and "metrics.AP" in run


def _checkpoint_folder(path, cfg):
    """A training checkpoint of a fresh `cfg.model` at `path`; returns the model."""
    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    save_checkpoint(path, model, opt, sched, scaler, TrainState(epoch=1), cfg)
    return model


def test_eval_a_checkpoint_folder_uses_its_own_model_config(
    ray_local, synthetic_root, tmp_path, capsys
):
    cfg = load_config(TINY, [*_args(synthetic_root, tmp_path), "model.fusion=hrnet"])
    _checkpoint_folder(tmp_path / "ckpt", cfg)
    # the command line says psm, the checkpoint says hrnet: the checkpoint's model wins
    args = ["eval", TINY, *_args(synthetic_root, tmp_path), "--checkpoint", str(tmp_path / "ckpt")]
    assert main(args) == 0
    assert _last_run(tmp_path)["params.model.fusion"] == "hrnet"


def test_eval_an_official_hrnet_checkpoint(ray_local, synthetic_root, tmp_path):
    torch.save(official_state_dict((8, 16, 32, 64)), tmp_path / "pose_hrnet_w8.pth")
    args = [*_args(synthetic_root, tmp_path), "--checkpoint", str(tmp_path / "pose_hrnet_w8.pth")]
    assert main(["eval", TINY, *args]) == 0
    run = _last_run(tmp_path)
    assert (run["params.model.fusion"], run["params.model.heatmap_stride"]) == ("hrnet", "4")


def test_oracle_on_synthetic_ground_truth(synthetic_root, tmp_path, capsys):
    assert main(["eval", TINY, *_args(synthetic_root, tmp_path), "--oracle"]) == 0
    assert _last_run(tmp_path)["metrics.AP"] > 0.9


def test_two_evaluations_in_the_same_second_are_two_mlflow_runs(
    synthetic_root, tmp_path, monkeypatch
):
    # the clock stands still for this module only (time.strftime is shared with everything)
    frozen = types.SimpleNamespace(strftime=lambda *args: "20261127-070000")
    monkeypatch.setattr("jobs.evaluate.time", frozen)
    for _ in range(2):
        assert main(["eval", TINY, *_args(synthetic_root, tmp_path), "--oracle"]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(mlflow.search_runs(experiment_names=["psm-pose"])) == 2


def test_eval_needs_a_checkpoint_or_oracle(synthetic_root, tmp_path):
    with pytest.raises(SystemExit, match="give --checkpoint CKPT, or --oracle"):
        main(["eval", TINY, *_args(synthetic_root, tmp_path)])


def _poses(results_file: Path) -> tuple[list[int], np.ndarray, np.ndarray]:
    results = json.loads(results_file.read_text())
    return (
        [r["image_id"] for r in results],
        np.array([r["keypoints"] for r in results]),
        np.array([r["score"] for r in results]),
    )


@pytest.mark.slow
def test_eval_on_actors_scores_as_in_process(ray_local, synthetic_root, tmp_path):
    cfg = load_config(TINY, _args(synthetic_root, tmp_path))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    recipe, val = EvalRecipe.of(cfg), ValSet.of(cfg)
    expected = evaluate_model(
        model, recipe, val, cfg.data.cpus_per_task, results_file=tmp_path / "in_process.json"
    )
    ids, keypoints, scores = _poses(tmp_path / "in_process.json")
    assert len(ids) > 0
    # the same weights registered in MLflow: `--checkpoint models:/NAME/VERSION` (issue 25, 8a)
    tracker = Tracker.of(cfg)
    registered = tracker.register_model(tracker.start_or_resume_run("reg", cfg), model, cfg)
    registry = f"models:/{cfg.train.registered_model}/{registered}"
    # 2 actors at half a CPU each leave 1 CPU for the crop tasks on the session's 2 CPUs
    for workers, cpus, checkpoint in ((1, 1.0, str(tmp_path / "model.pt")), (2, 0.5, registry)):
        results = tmp_path / f"actors{workers}.json"
        overrides = [f"eval.workers={workers}", f"eval.cpus_per_worker={cpus}"]
        args = [*_args(synthetic_root, tmp_path), *overrides, "--results", str(results)]
        assert main(["eval", TINY, *args, "--checkpoint", checkpoint]) == 0
        run = _last_run(tmp_path)
        assert run["params.eval.workers"] == str(workers)
        assert run["params.eval.checkpoint"] == checkpoint
        for k in METRIC_NAMES:
            assert run[f"metrics.{k}"] == pytest.approx(expected[k], abs=1e-6), k
        # an untrained model scores ~0 AP, so the poses themselves carry the comparison
        got_ids, got_keypoints, got_scores = _poses(results)
        assert got_ids == ids
        np.testing.assert_allclose(got_keypoints, keypoints, atol=1e-4)
        np.testing.assert_allclose(got_scores, scores, atol=1e-6)
        drawn = mlflow.MlflowClient().list_artifacts(run["run_id"], "poses")
        assert len(drawn) == min(cfg.eval.visualize, 4)  # 4 synthetic val images


@pytest.mark.slow
def test_eval_with_detections_gives_no_pose_to_an_image_without_boxes(
    ray_local, synthetic_root, tmp_path
):
    gt = json.loads((synthetic_root / "annotations" / "person_keypoints_val2017.json").read_text())
    no_boxes = min(image["id"] for image in gt["images"])
    dets = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
        if a["image_id"] != no_boxes
    ]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    torch.save(build_model(load_config(TINY).model).state_dict(), tmp_path / "model.pt")
    results = tmp_path / "results.json"
    args = [*_args(synthetic_root, tmp_path), "--checkpoint", str(tmp_path / "model.pt")]
    args += ["--dets", str(tmp_path / "dets.json"), "--results", str(results)]
    assert main(["eval", TINY, *args]) == 0
    ids, _, _ = _poses(results)
    assert no_boxes not in ids
    assert set(ids) == {d["image_id"] for d in dets}  # every other image keeps a pose
    run = _last_run(tmp_path)
    assert run["params.eval.boxes"] == str(tmp_path / "dets.json")
    # the run names its data: the val annotations and the boxes, each by its digest
    inputs = mlflow.MlflowClient().get_run(run["run_id"]).inputs.dataset_inputs
    named = {i.tags[0].value: i.dataset for i in inputs}
    assert set(named) == {"evaluation", "boxes"}
    digest = hashlib.sha256((tmp_path / "dets.json").read_bytes()).hexdigest()
    assert named["boxes"].digest == digest[:16]
    assert json.loads(named["boxes"].profile) == {"sha256": digest, "boxes": len(dets)}


@pytest.mark.slow
def test_eval_with_the_pose_model_on_onnx_runtime_scores_as_pytorch(
    ray_local, synthetic_root, tmp_path
):
    torch.manual_seed(0)
    torch.save(build_model(load_config(TINY).model).state_dict(), tmp_path / "model.pt")
    metrics = {}
    for runtime in ("torch", "onnxruntime"):
        args = [*_args(synthetic_root, tmp_path), f"eval.pose_runtime={runtime}"]
        results = tmp_path / f"{runtime}.json"
        argv = ["eval", TINY, *args, "--checkpoint", str(tmp_path / "model.pt")]
        assert main([*argv, "--results", str(results)]) == 0
        run = _last_run(tmp_path)
        assert run["params.eval.pose_runtime"] == runtime
        metrics[runtime] = run
    for k in METRIC_NAMES:
        assert metrics["onnxruntime"][f"metrics.{k}"] == pytest.approx(
            metrics["torch"][f"metrics.{k}"], abs=1e-3
        ), k
    torch_ids, _, torch_scores = _poses(tmp_path / "torch.json")
    onnx_ids, _, onnx_scores = _poses(tmp_path / "onnxruntime.json")
    assert onnx_ids == torch_ids
    np.testing.assert_allclose(onnx_scores, torch_scores, atol=1e-4)
