"""`psm infer`: image lists, the part bookkeeping, and the job end to end on the local Ray: the
same poses as `psm eval` with the same boxes, a killed job resumed to the same file, a corrupt
image skipped and counted, the test-dev format without annotations, and clear input errors."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from jobs.cli import main
from pipelines.box_sources import AnnotationBoxes, DetectorBoxes
from pipelines.coco import DataError, load_images
from pipelines.inference import PartStore, _Part, split_parts
from psm_model.coco_eval import EvalError, check_submission, validate_results
from psm_model.config_inference import DetectorConfig
from psm_model.config_yaml import load_config
from psm_model.hrnet import build_model
from psm_model.recipe import Rescoring

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
DETS = "person_detection_results/COCO_val2017_detections_AP_H_56_person_mmpose4.json"
INFO4 = "annotations/person_keypoints_val2017_mmpose4.json"  # the 4 images those boxes are of


def _image(image_id, name):
    return {"id": image_id, "file_name": name, "width": 64, "height": 48}


def test_load_images_reads_an_image_info_file_in_id_order(tmp_path):
    entries = [_image(7, "b.jpg"), _image(3, "a.jpg"), _image(9, "../x.jpg"), {"id": "x"}]
    (tmp_path / "info.json").write_text(json.dumps({"images": entries}))  # no "annotations"
    records, skips = load_images(tmp_path / "img", tmp_path / "info.json")
    assert [(r.image_id, Path(r.path).name, r.persons) for r in records] == [
        (3, "a.jpg", []),
        (7, "b.jpg", []),
    ]
    assert records[0].path == str((tmp_path / "img" / "a.jpg").resolve())
    assert skips == {"unsafe_file_name": 1, "bad_image": 1}


def test_load_images_errors_name_the_file_and_field(tmp_path):
    info = tmp_path / "info.json"
    info.write_text(json.dumps({"images": [_image(1, "a.jpg"), _image(1, "b.jpg")]}))
    with pytest.raises(DataError, match=r"info.json: images\[1\].id: duplicate image id 1"):
        load_images(tmp_path, info)
    info.write_text(json.dumps({"info": {}}))
    with pytest.raises(DataError, match="info.json: images: missing"):
        load_images(tmp_path, info)


def _row(image_id, boxes):
    return {"image_id": image_id, "ann_ids": np.arange(boxes)}


def _poses(image_ids, skips):
    n = len(image_ids)
    return {
        "image_id": np.array(image_ids, np.int64),
        "ann_id": np.zeros(n, np.int64),
        "center": np.full((n, 2), 50, np.float32),
        "scale": np.ones((n, 2), np.float32),
        "score": np.ones(n, np.float32),
        "skip": np.array(skips, dtype=object),
        "coords": np.full((n, 17, 2), 40.0),
        "maxvals": np.full((n, 17, 1), 0.5, np.float32),
    }


def test_a_part_is_complete_when_every_box_or_a_skip_came_back():
    cfg = load_config(TINY)
    part = _Part([_row(1, 2), _row(2, 0), _row(3, 1), _row(4, 3)], AnnotationBoxes("info.json"))
    assert part.due == {1: 2, 3: 1, 4: 3}  # image 2 has no box: nothing to wait for
    batch = _poses([1, 3, 4], ["", "", "corrupt_image"])  # image 4 failed to decode
    part.add(batch, np.arange(3))
    assert part.due == {1: 1}
    part.add(_poses([1], [""]), np.arange(1))
    assert not part.due
    out = part.finish(Rescoring.of(cfg))
    assert list(out) == ["image_ids", "persons", "skipped", "results"]  # the boxes are the input's
    assert out["image_ids"] == [1, 2, 3, 4] and out["persons"] == 3
    assert out["skipped"] == {"corrupt_image": 1}
    # images 1 (two identical poses: OKS-NMS keeps one) and 3
    assert sorted(r["image_id"] for r in out["results"]) == [1, 3]
    assert split_parts([_row(i, 1) for i in range(5)], 2)[2] == [_row(4, 1)]


def test_a_detector_part_learns_its_box_counts_from_the_rows_and_keeps_the_boxes():
    cfg = load_config(TINY)
    source = DetectorBoxes(DetectorConfig(model="d.onnx"), {}, "boxes.json")
    part = _Part([{"image_id": i, "path": f"{i}.jpg"} for i in (1, 2, 3)], source)
    assert part.due == {1: None, 2: None, 3: None}  # every image is waited for
    batch = _poses([1, 2, 3], ["", "no_person", "corrupt_image"])
    batch["box"] = np.array([[10, 20, 30, 40.123], [0, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    batch["image_boxes"] = np.array([2, 0, 0])  # image 1: two boxes, this row the first
    part.add(batch, np.arange(3))
    assert part.due == {1: 1} and part.no_person == 1
    last = _poses([1], [""])
    last["score"], last["box"] = np.array([0.95], np.float32), np.array([[1, 2, 3, 4]], np.float32)
    last["image_boxes"] = np.array([2])
    part.add(last, np.arange(1))
    assert not part.due
    out = part.finish(Rescoring.of(cfg))
    assert list(out) == ["image_ids", "persons", "skipped", "results", "no_person", "boxes"]
    assert out["persons"] == 2 and out["no_person"] == 1
    assert out["skipped"] == {"corrupt_image": 1}
    assert out["boxes"] == [  # by score, rounded as a detections file
        {"image_id": 1, "category_id": 1, "bbox": [10.0, 20.0, 30.0, 40.12], "score": 1.0},
        {"image_id": 1, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.95},
    ]


@pytest.mark.parametrize("uri", [False, True])
def test_a_parts_folder_resumes_and_refuses_other_inputs(tmp_path, uri):
    folder = f"file://{tmp_path}/p" if uri else str(tmp_path / "p")  # a pyarrow URI, or a path
    store = PartStore(folder, {"weights_sha256": "a", "part_images": 4})
    store.write(1, {"results": [{"score": 0.5}]})
    assert store.done(3) == [1]
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "LEASE",
        "manifest.json",
        "part-00001.json",
    ]
    store.release()
    again = PartStore(folder, {"weights_sha256": "a", "part_images": 4})
    assert again.done(3) == [1] and again.read(1) == {"results": [{"score": 0.5}]}
    again.release()
    with pytest.raises(
        DataError,
        match=r"p: holds parts of a job with other inputs "
        r"\(part_images, weights_sha256 differ\)",
    ):
        PartStore(folder, {"weights_sha256": "b", "part_images": 8})


def _args(tmp_path, *more):
    return [f"train.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}", *more]


def _run(tmp_path, name):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["psm-pose"], order_by=["start_time DESC"])
    return runs[runs["tags.mlflow.runName"].str.startswith(f"infer-{name}-")].iloc[0]


def _sorted(results):
    return sorted(results, key=lambda r: (r["image_id"], -r["score"], r["keypoints"]))


@pytest.mark.slow
def test_infer_gives_eval_poses_and_resumes_a_killed_job_to_the_same_file(
    ray_local, coco_root, tmp_path, monkeypatch
):
    torch.manual_seed(0)
    torch.save(build_model(load_config(TINY).model).state_dict(), tmp_path / "model.pt")
    common = [f"data.root={coco_root}", "infer.images=val2017", f"infer.image_info={INFO4}"]
    common += ["infer.part_images=1", "eval.visualize=2"]
    ckpt = ["--checkpoint", str(tmp_path / "model.pt"), "--dets", str(coco_root / DETS)]
    whole = tmp_path / "whole.json"
    assert main(["infer", TINY, *_args(tmp_path, *common), *ckpt, "--output", str(whole)]) == 0
    results = json.loads(whole.read_text())
    assert len(results) > 50  # 118 boxes on 4 images; OKS-NMS removes some
    ids = {i["id"] for i in json.loads((coco_root / INFO4).read_text())["images"]}
    assert validate_results(results, ids, "whole.json") == results  # the submission format
    run = _run(tmp_path, "whole")
    assert run["tags.psm.kind"] == "infer" and run["metrics.images"] == 4
    assert run["metrics.poses"] == len(results) and run["metrics.parts_resumed"] == 0
    artifacts = mlflow.MlflowClient().list_artifacts(run["run_id"], "results")
    assert [Path(a.path).name for a in artifacts] == ["whole.json"]
    assert len(mlflow.MlflowClient().list_artifacts(run["run_id"], "poses")) == 2

    # psm eval with the same boxes on the same annotation file: the same poses and AP
    evaluated = tmp_path / "eval.json"
    eval_args = [f"data.root={coco_root}", f"data.val_annotations={INFO4}"]
    assert (
        main(["eval", TINY, *_args(tmp_path, *eval_args), *ckpt, "--results", str(evaluated)]) == 0
    )
    expected = _sorted(json.loads(evaluated.read_text()))
    got = _sorted(results)
    assert [r["image_id"] for r in got] == [r["image_id"] for r in expected]
    np.testing.assert_allclose(
        [r["keypoints"] for r in got], [r["keypoints"] for r in expected], atol=1e-4
    )
    eval_run = mlflow.search_runs(experiment_names=["psm-pose"], order_by=["start_time DESC"])
    assert run["metrics.AP"] == pytest.approx(eval_run.iloc[0]["metrics.AP"], abs=1e-9)

    # killed after its second part: rerun, it poses only the 2 images left, and the file is equal
    # (written through a pyarrow URI, as to s3:// on a cluster)
    resumed = tmp_path / "resumed.json"
    writes = []
    real_write = PartStore.write

    def dies_after_two(self, index, part):
        if len(writes) == 2:
            raise KeyboardInterrupt("killed")
        writes.append(index)
        real_write(self, index, part)

    monkeypatch.setattr(PartStore, "write", dies_after_two)
    args = ["infer", TINY, *_args(tmp_path, *common), *ckpt, "--output", f"file://{resumed}"]
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert not resumed.exists() and _run(tmp_path, "resumed")["status"] == "FAILED"
    monkeypatch.setattr(PartStore, "write", real_write)
    assert main(args) == 0
    assert json.loads(resumed.read_text()) == results
    run = _run(tmp_path, "resumed")
    assert run["status"] == "FINISHED" and run["metrics.parts_resumed"] == 2
    assert run["metrics.images_with_boxes_sent"] == 2

    # the same output with another model is refused, naming what differs
    torch.save(build_model(load_config(TINY).model).state_dict(), tmp_path / "model.pt")
    assert main(args) == 2


@pytest.mark.slow
def test_infer_on_a_test_dev_style_list_skips_a_corrupt_image(
    ray_local, synthetic_root, tmp_path, capsys
):
    gt = json.loads((synthetic_root / "annotations" / "person_keypoints_val2017.json").read_text())
    images = tmp_path / "test2017"
    shutil.copytree(synthetic_root / "val2017", images)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    entries = [*gt["images"], {"id": 999, "file_name": "broken.jpg", "width": 64, "height": 48}]
    info = tmp_path / "image_info_test-dev2017.json"
    info.write_text(json.dumps({"images": entries, "categories": gt["categories"]}))
    dets = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
    ] + [{"image_id": 999, "category_id": 1, "bbox": [4, 4, 20, 30], "score": 0.8}]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    torch.save(build_model(load_config(TINY).model).state_dict(), tmp_path / "model.pt")
    output = tmp_path / "out" / "keypoints.json"
    args = [f"data.root={tmp_path}", "infer.images=test2017", f"infer.image_info={info.name}"]
    argv = ["infer", TINY, *_args(tmp_path, *args), "--checkpoint", str(tmp_path / "model.pt")]
    assert main([*argv, "--dets", str(tmp_path / "dets.json"), "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert {r["image_id"] for r in results} == {i["id"] for i in gt["images"]}
    run = _run(tmp_path, "keypoints")
    assert run["metrics.skipped_images"] == 1 and run["metrics.images"] == len(entries)
    assert "metrics.AP" not in run or np.isnan(run["metrics.AP"])  # no annotations: no score
    assert "1 images skipped" in capsys.readouterr().out


def test_infer_input_errors(synthetic_root, tmp_path, capsys):
    torch.save(build_model(load_config(TINY).model).state_dict(), tmp_path / "model.pt")
    argv = ["infer", TINY, *_args(tmp_path, f"data.root={synthetic_root}")]
    argv += ["--checkpoint", str(tmp_path / "model.pt")]
    assert main(argv) == 2
    assert "infer.detections: required" in capsys.readouterr().err
    assert main([*argv, "--dets", str(tmp_path / "dets.json")]) == 2
    assert "test2017: infer.images: not a folder" in capsys.readouterr().err
    det = ["infer", TINY, *_args(tmp_path, f"data.root={synthetic_root}", "infer.images=val2017")]
    det += ["infer.boxes=detector"]
    ckpt = ["--checkpoint", str(tmp_path / "model.pt")]
    assert main([*det, *ckpt]) == 2
    assert "infer.detector.model: required with infer.boxes=detector" in capsys.readouterr().err
    model = f"infer.detector.model={tmp_path / 'd.onnx'}"
    assert main([*det, model, *ckpt]) == 2
    assert f"{tmp_path / 'd.onnx'}: infer.detector.model: cannot read" in capsys.readouterr().err
    (tmp_path / "d.onnx").write_bytes(b"junk")
    assert main([*det, model, *ckpt]) == 2
    assert "d.onnx: ONNX Runtime cannot load the model" in capsys.readouterr().err


@pytest.mark.slow
def test_infer_with_the_detector_stage_resumes_and_reports_box_ap(
    ray_local, tmp_path, monkeypatch, capsys
):
    """Detector stage -> pose stage -> validated results on plain-background people (a real
    ONNX detector whose boxes are the figures'): the boxes file holds the drawn boxes, box AP is
    reported, the empty image is counted; a killed job resumes to the same file; the boxes file
    read back with infer.boxes=file and the pose model on ONNX Runtime give the same AP."""
    from benchmarks.toy_detector import export_toy_detector, write_plain_people

    drawn = write_plain_people(tmp_path / "data", images=5, seed=1)
    (tmp_path / "det.onnx").write_bytes(export_toy_detector("raw", (160, 160)))
    torch.manual_seed(0)
    torch.save(build_model(load_config(TINY).model).state_dict(), tmp_path / "model.pt")
    common = [f"data.root={tmp_path / 'data'}", "infer.images=images"]
    common += ["infer.image_info=annotations.json", "infer.part_images=2", "eval.visualize=0"]
    detector = ["infer.boxes=detector", f"infer.detector.model={tmp_path / 'det.onnx'}"]
    detector += ["infer.detector.input_size=[160,160]", "infer.detector.pad_value=20"]
    ckpt = ["--checkpoint", str(tmp_path / "model.pt")]
    whole = tmp_path / "whole.json"
    argv = ["infer", TINY, *_args(tmp_path, *common, *detector), *ckpt]
    assert main([*argv, "--output", str(whole)]) == 0
    results = json.loads(whole.read_text())
    assert {r["image_id"] for r in results} == {1, 2, 3, 4}  # image 5 is empty
    boxes = json.loads((tmp_path / "whole_person_boxes.json").read_text())
    assert [b["image_id"] for b in boxes] == [1, 2, 3, 4]
    for b, (x1, y1, x2, y2) in zip(boxes, drawn[:4], strict=True):
        x, y, w, h = b["bbox"]
        np.testing.assert_allclose([x, y, x + w, y + h], [x1, y1, x2, y2], atol=1.0)
    run = _run(tmp_path, "whole")
    assert run["metrics.images_no_person"] == 1 and run["metrics.boxes"] == 4
    assert run["metrics.box_AP"] > 0.9  # boxes within a pixel of the ground truth
    assert run["params.infer.box_source.boxes"] == "detector"
    assert len(run["params.infer.box_source.detector_sha256"]) == 64

    # killed after its first part: the rerun detects and poses only the rest, same file
    resumed = tmp_path / "resumed.json"
    real_write = PartStore.write
    writes = []

    def dies_after_one(self, index, part):
        if len(writes) == 1:
            raise KeyboardInterrupt("killed")
        writes.append(index)
        real_write(self, index, part)

    monkeypatch.setattr(PartStore, "write", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--output", str(resumed)])
    monkeypatch.setattr(PartStore, "write", real_write)
    assert main([*argv, "--output", str(resumed)]) == 0
    assert json.loads(resumed.read_text()) == results
    assert _run(tmp_path, "resumed")["metrics.parts_resumed"] == 1

    # the job's boxes as a detections file, the pose model on ONNX Runtime: the same AP
    onnx_out = tmp_path / "onnx.json"
    argv = ["infer", TINY, *_args(tmp_path, *common, "infer.pose_runtime=onnxruntime"), *ckpt]
    dets = str(tmp_path / "whole_person_boxes.json")
    assert main([*argv, "--dets", dets, "--output", str(onnx_out)]) == 0
    onnx_run = _run(tmp_path, "onnx")
    assert onnx_run["metrics.AP"] == pytest.approx(run["metrics.AP"], abs=1e-3)
    got = _sorted(json.loads(onnx_out.read_text()))
    assert [r["image_id"] for r in got] == [r["image_id"] for r in _sorted(results)]

    # ground-truth boxes (infer.boxes=gt): the empty image is counted as having no boxes
    gt_out = tmp_path / "gt.json"
    argv = ["infer", TINY, *_args(tmp_path, *common, "infer.boxes=gt"), *ckpt]
    assert main([*argv, "--output", str(gt_out)]) == 0
    assert {r["image_id"] for r in json.loads(gt_out.read_text())} == {1, 2, 3, 4}
    assert _run(tmp_path, "gt")["params.infer.box_source.boxes"] == "gt"

    # a part whose poses fail the check (written so by the job, its sha256 in the manifest: a
    # part corrupted on disk is redone instead): no results file, the error names entry and field
    part = tmp_path / "whole.json.parts" / "part-00000.json"
    data = json.loads(part.read_text())
    data["results"][1]["score"] = None
    part.write_text(json.dumps(data))
    manifest_file = part.parent / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["part_sha256"][part.name] = hashlib.sha256(part.read_bytes()).hexdigest()
    manifest_file.write_text(json.dumps(manifest, sort_keys=True))
    whole.unlink()
    capsys.readouterr()
    argv = ["infer", TINY, *_args(tmp_path, *common, *detector), *ckpt]
    assert main([*argv, "--output", str(whole)]) == 2
    assert f"{whole}: [1].score: expected a finite number" in capsys.readouterr().err
    assert not whole.exists()


def _pose(image_id, x=10.0, score=0.5):
    return {
        "image_id": image_id,
        "category_id": 1,
        "keypoints": [x, 20.0, 0.5] * 17,
        "score": score,
    }


def test_a_submission_checks_itself_naming_the_entry_and_field():
    images = {1: (64, 48), 2: (64, 48), 3: (64, 48)}
    good = [_pose(1), _pose(1, 12.0), _pose(3)]
    check_submission(good, images, {"no_person": 1}, "out.json")  # 2 posed + 1 no person
    with pytest.raises(
        EvalError,
        match=r"out.json: 3 images in the list, 2 with poses and 0 "
        r"accounted for .*: \[2\]",
    ):
        check_submission(good, images, {"no_person": 0}, "out.json")
    cases = [
        ({"category_id": 2}, r"out.json: \[1\].category_id: expected 1"),
        ({"keypoints": [1.0] * 50}, r"out.json: \[1\].keypoints: expected 51 finite numbers"),
        ({"keypoints": [float("nan")] * 51}, r"\[1\].keypoints: expected 51 finite numbers"),
        ({"score": float("inf")}, r"out.json: \[1\].score: expected a finite number"),
        ({"image_id": 9}, r"out.json: \[1\].image_id: 9 is not an image"),
        (
            {"keypoints": [10.0, 20.0, 1.0] * 16 + [500.0, 20.0, 1.0]},
            r"out.json: \[1\].keypoints: joint 16 at \(500.0, 20.0\) is far outside image 1",
        ),
    ]
    for change, message in cases:
        with pytest.raises(EvalError, match=message):
            check_submission(
                [good[0], {**good[1], **change}, good[2]], images, {"x": 1}, "out.json"
            )


@pytest.mark.slow
def test_an_inference_driver_killed_mid_job_reruns_to_a_byte_identical_file(ray_local, tmp_path):
    """A real kill: `psm infer` in a subprocess (on this session's Ray), SIGKILL once it has
    written parts, then the same command again; the file equals an uninterrupted job's."""
    from pipelines.synthetic import make_synthetic_coco

    make_synthetic_coco(tmp_path, 60, seed=5, val_fraction=0.5)  # 30 val images
    gt = json.loads((tmp_path / "annotations" / "person_keypoints_val2017.json").read_text())
    dets = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
    ]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    torch.save(build_model(load_config(TINY).model).state_dict(), tmp_path / "model.pt")
    common = [f"data.root={tmp_path}", "infer.images=val2017", "infer.part_images=1"]
    common += ["infer.image_info=annotations/person_keypoints_val2017.json", "eval.visualize=0"]
    argv = ["infer", TINY, *_args(tmp_path, *common), "--checkpoint", str(tmp_path / "model.pt")]
    argv += ["--dets", str(tmp_path / "dets.json")]

    def job(output: Path) -> subprocess.Popen:
        env = dict(
            os.environ,
            PYTHONPATH=str(Path(TINY).parents[1]),
            RAY_ADDRESS=ray_local.get_runtime_context().gcs_address,
        )
        args = [*argv, "--output", str(output)]
        code = f"import sys; from jobs.cli import main; sys.exit(main({args!r}))"
        return subprocess.Popen([sys.executable, "-c", code], env=env)

    whole = tmp_path / "whole.json"
    assert job(whole).wait(timeout=600) == 0
    killed = tmp_path / "killed.json"
    parts = tmp_path / "killed.json.parts"
    proc = job(killed)
    deadline = time.time() + 600
    while time.time() < deadline and len(list(parts.glob("part-*.json"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not killed.exists(), "the job finished before it could be killed"
    assert 3 <= len(list(parts.glob("part-*.json"))) < 30 and (parts / "LEASE").exists()
    # a part counts as done once the manifest holds its sha256 (written after the part file: a
    # kill between the two leaves a part that is redone)
    recorded = len(json.loads((parts / "manifest.json").read_text())["part_sha256"])
    assert recorded >= 2
    assert job(killed).wait(timeout=600) == 0  # the dead job's lease is taken over
    assert killed.read_bytes() == whole.read_bytes()
    assert _run(tmp_path, "killed")["metrics.parts_resumed"] == recorded
