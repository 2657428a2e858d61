"""`psm export onnx` and the ONNX Runtime pose runtime: the exported graph against PyTorch on the
same inputs (heatmaps within 1e-4, the same argmax) for fusion psm / hrnet at stride 2 / 4, the
PixelShuffle order (DepthToSpace CRD), a dynamic batch, and the same poses through predict_poses."""

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from jobs.cli import main
from pipelines.actors import OnnxPoseModel
from pipelines.augment import image_rows, rows_to_columns
from pipelines.coco import load_coco_persons
from pipelines.eval_crops import eval_batch
from pipelines.predict import predict, predict_poses
from psm_model.config_yaml import load_config
from psm_model.export import check_depth_to_space, export_onnx
from psm_model.hrnet import build_model, normalize_images
from psm_model.recipe import EvalRecipe

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def _model(fusion: str, stride: int, seed: int = 0) -> torch.nn.Module:
    """A W8 model with random BatchNorm statistics and affine parameters (freshly initialised BN
    is the identity, which would hide a wrong folding of BN into the convolutions) and a final
    layer 1000x the init's std 0.001 (heatmaps of ~1, a trained model's range, not ~1e-3, where
    1e-4 would prove little)."""
    cfg = load_config(TINY, [f"model.fusion={fusion}", f"model.heatmap_stride={stride}"])
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.final_layer.weight.data *= 1000
    return model.eval()


def _people(root: Path, n: int = 3) -> torch.Tensor:
    """`n` synthetic val images (drawn people), resized to 128x96 and normalised: natural
    structure gives heatmaps with distinct peaks where random noise gives flat ones."""
    files = sorted((root / "val2017").glob("*.jpg"))[:n]
    images = [cv2.resize(cv2.imread(str(f))[..., ::-1], (96, 128)) for f in files]
    return normalize_images(torch.from_numpy(np.ascontiguousarray(np.stack(images))))


@pytest.mark.parametrize("fusion", ["psm", "hrnet"])
@pytest.mark.parametrize("stride", [2, 4])
def test_onnx_runtime_matches_pytorch(fusion, stride, synthetic_root):
    model = _model(fusion, stride)
    data = export_onnx(model, (128, 96))
    ops = {n.op_type for n in onnx.load_from_string(data).graph.node}
    assert "BatchNormalization" not in ops  # folded into the convolutions
    # PSM fusion and the stride-2 head pixel-shuffle; plain HRNet at stride 4 never does
    assert (check_depth_to_space(data, "model") > 0) == (fusion == "psm" or stride == 2)
    x = _people(synthetic_root)  # batch 3 through a model exported at batch 2: dynamic batch
    with torch.no_grad():
        expected = model(x)
    got = OnnxPoseModel(data, "test model")(x)
    assert got.shape == expected.shape == (3, 17, 128 // stride, 96 // stride)
    assert 0.3 < expected.abs().max() < 30  # heatmaps in a trained model's range, not ~1e-3
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4
    # the same argmax wherever it is defined to within the runtimes' difference: an untrained
    # model's maps are smooth, and a peak that beats the runner-up by less than 2 * diff may
    # fall on either pixel in either runtime
    top2 = expected.flatten(2).topk(2, -1).values
    distinct = top2[..., 0] - top2[..., 1] > 2 * max(diff, 1e-6)
    assert distinct.float().mean() > 0.3  # the check below is not vacuous
    same = got.flatten(2).argmax(-1) == expected.flatten(2).argmax(-1)
    assert same[distinct].all()


def test_a_depth_to_space_in_the_other_channel_order_is_refused():
    node = helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, mode="DCR", name="d2s")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
    )
    data = helper.make_model(graph).SerializeToString()
    with pytest.raises(ValueError, match="m.onnx: node d2s: DepthToSpace mode DCR, expected CRD"):
        check_depth_to_space(data, "m.onnx")


def test_onnx_poses_equal_torch_poses_on_real_crops(synthetic_root):
    """predict_poses (flip test, decode, map to the image) with either runtime, on the crops of
    the synthetic val people."""
    cfg = load_config(TINY)
    model = _model("psm", 2)
    records, _ = load_coco_persons(
        synthetic_root / "val2017",
        synthetic_root / "annotations" / "person_keypoints_val2017.json",
        cfg.model.input_size,
        cfg.data.box_padding,
        False,
    )
    rows = image_rows(records[:2])
    batch = eval_batch(rows_to_columns(rows), input_size=(128, 96), max_pixels=1 << 26)
    onnx_model = OnnxPoseModel(export_onnx(model, (128, 96)), "test model")
    recipe = EvalRecipe.of(cfg)
    expected = predict_poses(model, batch, recipe, "cpu")
    got = predict_poses(onnx_model, batch, recipe, "cpu")
    assert len(got["coords"]) == sum(len(r["ann_ids"]) for r in rows) >= 2
    np.testing.assert_allclose(got["maxvals"], expected["maxvals"], atol=1e-4)
    # the same keypoints wherever the (flip-averaged) peak is defined beyond float error
    top2 = predict(model, batch["image"], recipe, "cpu").flatten(2).topk(2, -1).values
    distinct = (top2[..., 0] - top2[..., 1] > 1e-5).numpy()
    assert distinct.mean() > 0.3
    np.testing.assert_allclose(got["coords"][distinct], expected["coords"][distinct], atol=1e-3)


def test_psm_export_onnx_writes_a_dynamic_batch_model(tmp_path, capsys):
    model = _model("psm", 2)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "onnx" / "model.onnx"
    argv = ["export", "onnx", TINY, "--checkpoint", str(tmp_path / "model.pt")]
    assert main([*argv, "--output", str(out)]) == 0
    assert "images (batch, 3, 128, 96) -> heatmaps (batch, 17, 64, 48)" in capsys.readouterr().out
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        expected = model(x)
    assert (OnnxPoseModel(str(out), str(out))(x) - expected).abs().max().item() <= 1e-4
