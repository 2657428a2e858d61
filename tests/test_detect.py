"""The detector stage's pieces without Ray: the letterbox and its exact inverse, both output
layouts of real ONNX models (exported from torch) whose boxes are the box around a figure drawn on
a plain background, NMS and the thresholds as configured, and clear errors for an unknown layout
or a missing file."""

import io
import warnings

import numpy as np
import pytest
import torch

from benchmarks.toy_detector import export_toy_detector, plain_image
from pipelines.augment import rows_to_columns
from pipelines.detect import (
    DetectorError,
    box_row,
    detect_and_crop,
    detect_people,
    detector_session,
    fit,
    letterbox,
    load_detector,
    nms,
)
from pipelines.eval_crops import eval_batch
from pipelines.images import decode_image
from psm_model.config_yaml import load_config
from psm_model.recipe import CropSpec

SIZE = (160, 160)  # the test detectors' input (height, width)


def _det(*overrides):
    base = ["infer.detector.input_size=[160,160]", "infer.detector.pad_value=20"]
    return load_config(None, [*base, *overrides])


@pytest.fixture(scope="module", params=["end2end", "raw"])
def toy(request):
    data = export_toy_detector(request.param, SIZE)
    session, layout = detector_session(data, f"toy-{request.param}.onnx")
    assert layout == request.param
    return session, layout


@pytest.mark.parametrize("center", [False, True])
def test_letterbox_inverse_maps_input_boxes_back_to_image_pixels(center):
    image = np.zeros((75, 130, 3), np.uint8)
    canvas, box = letterbox(image, (64, 96), 114, center)
    assert canvas.shape == (64, 96, 3)
    # 130 -> 96 wide (scale 0.738), 75 -> 55 high: 9 rows of padding, split when centred
    assert (box.pad_x, box.pad_y) == ((0, 4) if center else (0, 0))
    assert (
        canvas[box.pad_y + 55 :, :].min() == 114 and canvas[box.pad_y : box.pad_y + 55].max() == 0
    )
    xyxy = np.array([[10.0, 5.0, 100.0, 70.0], [-5.0, -3.0, 140.0, 80.0]])
    into = xyxy.copy()
    into[:, 0::2] = xyxy[:, 0::2] * box.sx + box.pad_x
    into[:, 1::2] = xyxy[:, 1::2] * box.sy + box.pad_y
    back = box.to_image(into)
    np.testing.assert_allclose(back[0], xyxy[0], atol=1e-9)
    np.testing.assert_allclose(back[1], [0, 0, 130, 75])  # clipped to the image


@pytest.mark.parametrize("center", [False, True])
def test_a_letterbox_of_the_image_fitted_elsewhere_is_the_same(center):
    """`psm serve` fits the image in its HTTP replica and letterboxes it in the detector's:
    the same canvas and map as the letterbox of the whole image."""
    image = np.random.default_rng(0).integers(0, 255, (75, 130, 3), np.uint8)
    fitted = fit(image, (64, 96))
    assert fitted.shape == (55, 96, 3)
    canvas, box = letterbox(fitted, (64, 96), 114, center, image_hw=(75, 130))
    whole_canvas, whole_box = letterbox(image, (64, 96), 114, center)
    np.testing.assert_array_equal(canvas, whole_canvas)
    assert box == whole_box


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10.0]])
    scores = np.array([0.5, 0.9, 0.7, 0.1])
    # box 1 overlaps box 0 with IoU 9/11 = 0.82 and box 3 with the same
    assert nms(boxes, scores, 0.5, 10).tolist() == [1, 2]
    assert nms(boxes, scores, 0.85, 10).tolist() == [1, 2, 0]  # score order; 3 = 0: IoU 1
    assert nms(boxes, scores, 0.5, 1).tolist() == [1]


@pytest.mark.parametrize(
    "size, box",
    [
        ((120, 90), (10, 20, 50, 100)),
        ((90, 140), (30, 5, 131, 80)),
        ((100, 160), (0, 60, 160, 100)),
    ],
)
def test_detector_boxes_equal_the_drawn_box_after_the_letterbox_round_trip(toy, size, box):
    session, layout = toy
    boxes, scores = detect_people(session, layout, plain_image(size, box), _det().infer.detector)
    # one box (the shifted copy is removed by NMS at IoU 0.65, the 0.05 one by the threshold,
    # the raw layout's class-1 box by the person class)
    assert scores.tolist() == pytest.approx([0.9])
    corners = np.concatenate([boxes[0, :2], boxes[0, :2] + boxes[0, 2:]])  # COCO xywh -> xyxy
    np.testing.assert_allclose(corners, box, atol=1.0)  # each edge to a pixel
    # fitted to the detector's input first (psm serve's HTTP replica): the same boxes
    image, det = plain_image(size, box), _det().infer.detector
    fitted = detect_people(session, layout, fit(image, det.input_size), det, image.shape[:2])
    np.testing.assert_array_equal(fitted[0], boxes)
    np.testing.assert_array_equal(fitted[1], scores)


def test_thresholds_nms_and_sizes_act_as_configured(toy):
    session, layout = toy
    image = plain_image((120, 90), (10, 20, 50, 100))

    def scores(*overrides):
        return detect_people(session, layout, image, _det(*overrides).infer.detector)[1].tolist()

    # NMS at IoU 0.99 keeps the copy shifted by 2 model pixels (IoU ~0.9 with the true box)
    assert scores("infer.detector.nms_iou=0.99") == pytest.approx([0.9, 0.8])
    assert scores("infer.detector.score_threshold=0.01") == pytest.approx([0.9, 0.05])
    assert scores("infer.detector.score_threshold=0.95") == []
    assert scores("infer.detector.nms_iou=0.99", "infer.detector.max_persons=1") == [
        pytest.approx(0.9)
    ]
    assert scores("infer.detector.min_box_size=50") == []  # the box is 40 x 80
    if layout == "raw":  # the 4th anchor is a class-1 box at 0.95
        assert scores("infer.detector.person_class=1") == pytest.approx([0.95])
    # a padding value other than the background makes the padding "foreground": the box then
    # reaches the image's edges (the letterbox pads beside the 120 x 90 image, full height)
    wrong = _det("infer.detector.pad_value=200").infer.detector
    boxes, _ = detect_people(session, layout, image, wrong)
    assert boxes[0][1] == 0 and boxes[0][1] + boxes[0][3] == 120


def test_an_image_without_a_person_gives_no_boxes_and_a_no_person_row(toy, tmp_path):
    import cv2

    session, layout = toy
    cfg = _det("model.input_size=[128,96]")
    empty, person = tmp_path / "empty.png", tmp_path / "person.png"
    cv2.imwrite(str(empty), plain_image((100, 100), None))
    cv2.imwrite(str(person), plain_image((120, 90), (10, 20, 50, 100)))
    paths = [str(empty), str(person), str(tmp_path / "gone.png")]
    images = {"image_id": np.array([5, 6, 7]), "path": np.array(paths)}
    crops = detect_and_crop(images, session, layout, CropSpec.of(cfg), cfg.infer.detector)
    assert crops["skip"].tolist() == ["no_person", "", "missing_image"]
    assert crops["image_id"].tolist() == [5, 6, 7] and crops["image_boxes"].tolist() == [0, 1, 0]
    np.testing.assert_allclose(crops["box"][1], [10, 20, 40, 80], atol=2.0)
    assert crops["image"].shape == (3, 128, 96, 3)
    # one decode serves detection and crop: the crop is the one the crop step makes from the file
    boxes, scores = detect_people(
        session, layout, decode_image(str(person), 1 << 26), cfg.infer.detector
    )
    row = box_row(6, str(person), boxes, scores, CropSpec.of(cfg))
    alone = eval_batch(rows_to_columns([row]), input_size=(128, 96), max_pixels=1 << 26)
    np.testing.assert_array_equal(crops["image"][1], alone["image"][0])
    np.testing.assert_array_equal(crops["center"][1], alone["center"][0])
    np.testing.assert_allclose(crops["center"][1], [30, 60], atol=2.0)  # the figure's centre


class _Unknown(torch.nn.Module):
    def forward(self, x):
        return x.mean((2, 3)), x.amax((2, 3))  # two (1, 3) outputs: neither layout


def test_unknown_layout_and_missing_file_are_clear_errors(tmp_path):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Unknown(),
            (torch.zeros(1, 3, 32, 32),),
            buffer,
            dynamo=False,
            input_names=["images"],
            output_names=["a", "b"],
        )
    with pytest.raises(
        DetectorError,
        match=r"odd.onnx: unknown detector output layout \(inputs "
        r"images \[1, 3, 32, 32\]; outputs a \[1, 3\], b \[1, 3\]\)",
    ):
        detector_session(buffer.getvalue(), "odd.onnx")
    with pytest.raises(DetectorError, match="nothere.onnx: infer.detector.model: cannot read"):
        load_detector(str(tmp_path / "nothere.onnx"))
    with pytest.raises(DetectorError, match="bad.onnx: ONNX Runtime cannot load the model"):
        detector_session(b"not a model", "bad.onnx")
