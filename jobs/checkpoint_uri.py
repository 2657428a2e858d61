"""A `--checkpoint` wherever it lives, as every command reads it (eval, infer, serve, export).

`psm_model/checkpoint.py: load_model` reads every local kind (a checkpoint folder, a kept-best
folder, an official HRNet .pth, a state_dict file); what is not local is first copied to a
temporary folder by the layer that can reach it: a pyarrow URI (the s3:// checkpoints of a
cluster's train.storage_path) by `pipelines/uris.py`, a registered model (`models:/NAME/VERSION`,
its checkpoint folder, no pickle: `jobs/registered_model.py`) by `jobs/tracking.py`.
"""

from __future__ import annotations

import tempfile

from jobs.tracking import Tracker
from pipelines.uris import copy_to_local
from psm_model.checkpoint import load_model as load_local_model
from psm_model.config import Config
from psm_model.hrnet import PoseHRNet
from psm_model.weights import CheckpointError


def load_model(checkpoint: str, cfg: Config, tracker: Tracker) -> tuple[PoseHRNet, Config]:
    """The checkpoint's model and `cfg` with its model config (a folder's own config wins): a
    local path, a pyarrow URI or a registered model (from `tracker`'s store)."""
    if not checkpoint.startswith("models:/") and "://" not in checkpoint:
        return load_local_model(checkpoint, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint.startswith("models:/"):
            local = tracker.download_model(checkpoint, tmp)
        else:
            local = copy_to_local(checkpoint, tmp, "checkpoint", CheckpointError)
        return load_local_model(local, cfg)
