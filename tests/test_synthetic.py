"""The synthetic COCO generator: COCO's schema and rules, determinism, and left/right colours."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from pipelines.coco import load_coco_persons
from pipelines.images import decode_image
from pipelines.synthetic import (
    KEYPOINT_NAMES,
    LIMBS,
    PERSON_CATEGORY,
    demo_data_complete,
    make_synthetic,
    make_synthetic_coco,
)
from psm_model.config_yaml import load_config
from psm_model.geometry import COCO_FLIP_PAIRS

ANN_KEYS = {
    "id",
    "image_id",
    "category_id",
    "keypoints",
    "num_keypoints",
    "bbox",
    "area",
    "iscrowd",
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    counts = make_synthetic(out, train_images=24, val_images=6, seed=3)
    return out, counts


def _annotations(out, split: str) -> dict:
    return json.loads((out / "annotations" / f"person_keypoints_{split}.json").read_text())


def test_coco_schema_loads_with_pycocotools(synthetic):
    out, counts = synthetic
    for split in ("train2017", "val2017"):
        coco = COCO(str(out / "annotations" / f"person_keypoints_{split}.json"))
        assert coco.loadCats(coco.getCatIds()) == [PERSON_CATEGORY]
        assert len(coco.getImgIds()) == counts[split]["images"]
        assert len(coco.getAnnIds()) == counts[split]["persons"]
        for ann in coco.loadAnns(coco.getAnnIds()):
            assert set(ann) == ANN_KEYS and ann["category_id"] == 1 and ann["iscrowd"] == 0
            kp = np.array(ann["keypoints"]).reshape(17, 3)
            assert set(kp[:, 2]) <= {0, 1, 2}
            assert (kp[kp[:, 2] == 0, :2] == 0).all()  # COCO: unlabelled keypoints are (0, 0)
            assert ann["num_keypoints"] == (kp[:, 2] > 0).sum() > 0
            w, h = ann["bbox"][2:]
            assert ann["area"] == pytest.approx(0.6 * w * h, abs=0.01)
        for image in coco.loadImgs(coco.getImgIds()):
            assert 1 <= len(coco.getAnnIds(imgIds=image["id"])) <= 4
            pixels = decode_image(out / split / image["file_name"], max_pixels=10**6)
            assert pixels.shape == (image["height"], image["width"], 3)
            assert 240 <= image["height"] <= 480 and 320 <= image["width"] <= 640


def test_labelled_keypoints_lie_in_their_box_and_the_image(synthetic):
    out, _ = synthetic
    data = _annotations(out, "train2017")
    sizes = {i["id"]: (i["width"], i["height"]) for i in data["images"]}
    v_seen = set()
    for ann in data["annotations"]:
        kp = np.array(ann["keypoints"]).reshape(17, 3)
        xy = kp[kp[:, 2] > 0, :2]
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        assert (xy >= (x, y)).all() and (xy <= (x + w, y + h)).all()
        assert (xy >= 0).all() and (xy <= (width - 1, height - 1)).all()
        assert 0 <= x and 0 <= y and x + w <= width + 0.01 and y + h <= height + 0.01
        v_seen |= set(kp[:, 2].astype(int).tolist())
    assert v_seen == {0, 1, 2}  # outside, hidden and visible keypoints all occur


def test_ids_are_unique_across_splits(synthetic):
    out, _ = synthetic
    train, val = _annotations(out, "train2017"), _annotations(out, "val2017")
    image_ids = [i["id"] for i in train["images"] + val["images"]]
    ann_ids = [a["id"] for a in train["annotations"] + val["annotations"]]
    assert len(set(image_ids)) == len(image_ids) and len(set(ann_ids)) == len(ann_ids)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        make_synthetic_coco(tmp_path / name, num_images=4, seed=seed)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert len(files) == 2 + 4  # two JSON files, four JPEGs (3 train + 1 val)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    json_a = (tmp_path / "a" / "annotations" / "person_keypoints_train2017.json").read_bytes()
    assert (
        json_a != (tmp_path / "c" / "annotations" / "person_keypoints_train2017.json").read_bytes()
    )


def test_left_and_right_limbs_have_different_colours(synthetic):
    """Sample each limb's midpoint: it should be nearer its own side's colour than the other's."""
    out, _ = synthetic
    data = _annotations(out, "train2017")
    files = {i["id"]: out / "train2017" / i["file_name"] for i in data["images"]}
    colours = {(a, b): np.array(c) for a, b, c in LIMBS}
    pairs = [((5, 7), (6, 8)), ((7, 9), (8, 10)), ((11, 13), (12, 14)), ((13, 15), (14, 16))]
    right, total = 0, 0
    for ann in data["annotations"]:
        kp = np.array(ann["keypoints"]).reshape(17, 3)
        if ann["bbox"][3] < 80:  # thin limbs of small figures blur into the background
            continue
        pixels = decode_image(files[ann["image_id"]], max_pixels=10**6).astype(float)
        for left, right_limb in pairs:
            for limb, other in ((left, right_limb), (right_limb, left)):
                if (kp[list(limb), 2] != 2).any():
                    continue
                x, y = np.round(kp[list(limb), :2].mean(0)).astype(int)
                sample = pixels[y, x]
                own = np.linalg.norm(sample - colours[limb])
                right += own < np.linalg.norm(sample - colours[other])
                total += 1
    assert total >= 30
    assert right / total > 0.8  # misses: a midpoint covered by another limb or person


def test_flip_pairs_name_left_and_right():
    for a, b in COCO_FLIP_PAIRS:
        assert KEYPOINT_NAMES[a].startswith("left_")
        assert KEYPOINT_NAMES[b] == KEYPOINT_NAMES[a].replace("left_", "right_")


def test_coco_loader_reads_it_back(synthetic):
    out, counts = synthetic
    for split in ("train2017", "val2017"):
        records, skips = load_coco_persons(
            out / split, out / "annotations" / f"person_keypoints_{split}.json", (256, 192)
        )
        assert not skips
        assert len(records) == counts[split]["images"]
        assert sum(len(r.persons) for r in records) == counts[split]["persons"]


def test_split_counts_and_summary(tmp_path, capsys, synthetic):
    counts = make_synthetic_coco(tmp_path, num_images=5, val_fraction=0.2)
    assert {s: c["images"] for s, c in counts.items()} == {"train2017": 4, "val2017": 1}
    _, counts = synthetic
    assert counts["train2017"]["images"] == 24 and counts["val2017"]["images"] == 6
    with pytest.raises(ValueError, match="num_images"):
        make_synthetic_coco(tmp_path, num_images=1)
    make_synthetic(tmp_path / "s", train_images=1, val_images=1)
    assert "val2017: 1 images" in capsys.readouterr().out


def _make_data(out, images: int) -> subprocess.Popen:
    args = ["make-data", "synthetic", str(out), "--images", str(images)]
    code = f"from jobs.cli import main; main({args!r})"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL)


def test_a_killed_make_data_leaves_no_half_file_and_a_rerun_gives_valid_data(tmp_path):
    killed = tmp_path / "killed"
    proc = _make_data(killed, 150)  # 120 train images, then 30 val images
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "val2017").glob("*.jpg"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # a real kill, mid-way through the val split
    proc.wait()
    cfg = load_config(None, [f"data.root={killed}"])
    assert (killed / "annotations" / "person_keypoints_train2017.json").exists()
    assert not demo_data_complete(cfg)  # before: the demo saw the train file and went on
    for jpeg in killed.glob("*/*.jpg"):  # every file that has its name is whole
        decode_image(jpeg, 10**8)
    proc = _make_data(killed, 150)
    assert proc.wait() == 0 and demo_data_complete(cfg)
    whole = tmp_path / "whole"
    assert _make_data(whole, 150).wait() == 0
    for split in ("train2017", "val2017"):  # the same data as a run never killed
        name = f"annotations/person_keypoints_{split}.json"
        assert (killed / name).read_bytes() == (whole / name).read_bytes()
        records, skips = load_coco_persons(killed / split, killed / name, (64, 48))
        assert records and not skips.get("bad_box")
        for r in records:
            decode_image(r.path, 10**8)


def test_a_coco_size_file_repeats_a_root_with_fresh_ids_over_its_real_images(
    synthetic_root, tmp_path
):
    """`psm make-data coco-size`: the load and memory tests' COCO-size annotations."""
    from jobs.cli import main
    from pipelines.coco import load_split
    from psm_model.config_yaml import load_config

    out = tmp_path / "big"
    assert (
        main(["make-data", "coco-size", str(out), "--from", str(synthetic_root), "--images", "50"])
        == 0
    )
    data = json.loads((out / "annotations/person_keypoints_train2017.json").read_text())
    source = json.loads(
        (synthetic_root / "annotations/person_keypoints_train2017.json").read_text()
    )
    assert len(data["images"]) == 50 and len({i["id"] for i in data["images"]}) == 50
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    per_copy = len(source["annotations"]) / len(source["images"])
    assert len(data["annotations"]) == pytest.approx(50 * per_copy, rel=0.3)
    assert (out / "train2017").resolve() == (synthetic_root / "train2017").resolve()
    cfg = load_config(None, [f"data.root={out}"])
    records, _ = load_split(cfg, "train")
    assert len(records) == 50 and all(Path(r.path).exists() for r in records)
