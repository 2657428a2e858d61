"""The registered model's code (MLflow "models from code", logged by `Tracker.register_model`).

MLflow copies this file into the model and runs it to load the model, so loading unpickles
nothing: the weights are the checkpoint folder logged beside it (`artifacts/checkpoint/`:
model.pt, a state dict read with `weights_only=True`, config.yaml and checksums.json), built by
`psm_model` (shipped in the model's `code/`). `psm eval --checkpoint models:/NAME/VERSION` reads
the same folder without MLflow's loader.

    model = mlflow.pyfunc.load_model("models:/psm_model/1")
    heatmaps = model.predict(crops)  # N x 3 x H x W float32 (normalised RGB) -> N x 17 x h x w
"""

import mlflow
import numpy as np
import torch

from psm_model.checkpoint import load_checkpoint_model

CHECKPOINT = "checkpoint"  # the artifact name of the checkpoint folder


class PoseModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.model, _ = load_checkpoint_model(context.artifacts[CHECKPOINT])
        self.model.eval()

    # np.ndarray: a type hint MLflow reads no schema from (the signature is given); without one
    # it warns on every load that a hint is missing
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        crops = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.model(crops).numpy()


mlflow.models.set_model(PoseModel())
