"""jobs/checkpoint_uri.py: a `--checkpoint` that is a pyarrow URI is copied to a local folder and
read as the local path would be (a registered model, `models:/...`: test_eval_job, test_train)."""

from pathlib import Path

import pytest
import torch
from test_checkpoint import _save  # a training checkpoint folder

from jobs.checkpoint_uri import load_model
from jobs.tracking import Tracker
from psm_model.config_yaml import load_config
from psm_model.hrnet import build_model
from psm_model.weights import CheckpointError

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def test_a_checkpoint_is_read_from_a_pyarrow_uri(tmp_path):
    cfg = load_config(TINY, ["model.fusion=hrnet"])
    model = _save(tmp_path / "ckpt", cfg, epoch=1)
    torch.save(build_model(load_config(TINY).model).state_dict(), tmp_path / "model.pt")  # psm
    for uri, fusion in (
        (f"file://{tmp_path}/ckpt", "hrnet"),
        (f"file://{tmp_path}/model.pt", "psm"),
    ):
        # a folder brings its own model config (hrnet); a weights file takes the given one
        given = load_config(TINY, [f"model.fusion={fusion}"])
        loaded, got = load_model(uri, given, Tracker.of(given))
        assert got.model.fusion == fusion
        if fusion == "hrnet":
            weights = loaded.state_dict()  # once, not per key
            for k, v in model.state_dict().items():
                assert torch.equal(weights[k], v), k
    with pytest.raises(CheckpointError, match="missing: checkpoint not found"):
        load_model(f"file://{tmp_path}/missing", cfg, Tracker.of(cfg))
