"""`psm eval` end to end on the local Ray: a state_dict file, a training checkpoint folder, an
official HRNet .pth, and the GT oracle; metrics printed and logged to MLflow."""

from pathlib import Path

import mlflow
import pytest
import torch
from official_reference import official_state_dict

from jobs.cli import main
from psm_model.checkpoint import TrainState, save_checkpoint
from psm_model.config import load_config
from psm_model.hrnet import build_model

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
    assert main([*args, "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "model evaluation on" in out and "| AP | AP50 |" in out
    assert results.exists()
    run = _last_run(tmp_path)
    assert run["params.eval.kind"] == "model" and "metrics.AP" in run


def test_eval_a_checkpoint_folder_uses_its_own_model_config(
    ray_local, synthetic_root, tmp_path, capsys
):
    cfg = load_config(TINY, [*_args(synthetic_root, tmp_path), "model.fusion=hrnet"])
    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1])
    save_checkpoint(
        tmp_path / "ckpt", model, opt, sched, torch.amp.GradScaler("cpu", enabled=False),
        TrainState(epoch=1), cfg,
    )  # fmt: skip
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


def test_eval_needs_a_checkpoint_or_oracle(synthetic_root, tmp_path):
    with pytest.raises(SystemExit, match="give --checkpoint CKPT, or --oracle"):
        main(["eval", TINY, *_args(synthetic_root, tmp_path)])
