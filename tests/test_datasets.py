"""The Ray Data graphs on a local Ray: sharding, determinism across worker counts, skips."""

import subprocess
import sys
import threading
from collections import Counter

import cv2
import numpy as np

from pipelines.actors import model_actors
from pipelines.augment import SAMPLE_COLUMNS, count_skips, image_rows, rows_to_columns, train_batch
from pipelines.coco import load_coco_persons
from pipelines.datasets import crops_task, train_crops
from psm_model.config_yaml import load_config

CFG = load_config(None, ["model.input_size=[128,96]", "model.width=8"])


def _rows(root, split="train2017", for_training=True):
    records, _ = load_coco_persons(
        root / split,
        root / f"annotations/person_keypoints_{split}.json",
        (128, 96),
        1.25,
        for_training,
    )
    return records, image_rows(records)


def _same(a, b):
    return len(a) == len(b) and all(
        x["ann_id"] == y["ann_id"]
        and np.array_equal(x["image"], y["image"])
        and np.array_equal(x["keypoints"], y["keypoints"])
        for x, y in zip(a, b, strict=True)
    )


def test_same_samples_with_one_or_two_workers(ray_local, synthetic_root):
    records, rows = _rows(synthetic_root)
    one = train_crops(rows, CFG, epoch=0, num_blocks=1, concurrency=1).take_all()
    two = train_crops(rows, CFG, epoch=0, num_blocks=6, concurrency=2).take_all()
    assert len(one) == sum(len(r.persons) for r in records)
    assert _same(one, two)
    other_epoch = train_crops(rows, CFG, epoch=1, num_blocks=6, concurrency=2).take_all()
    assert not any(
        np.array_equal(x["image"], y["image"]) for x, y in zip(one, other_epoch, strict=True)
    )


def test_corrupt_image_is_skipped_and_counted_not_fatal(ray_local, synthetic_root, tmp_path):
    records, rows = _rows(synthetic_root)
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes((synthetic_root / "train2017" / records[1].file_name).read_bytes()[:500])
    rows[1] = {**rows[1], "path": str(bad)}
    rows[2] = {**rows[2], "path": str(tmp_path / "missing.jpg")}
    skips, samples = Counter(), 0
    for batch in train_crops(rows, CFG, epoch=0).iter_batches(batch_size=8, batch_format="numpy"):
        skips += count_skips(batch["skip"])
        samples += int((batch["skip"] == "").sum())
    assert dict(skips) == {"corrupt_image": 1, "missing_image": 1}
    expected = sum(len(r.persons) for i, r in enumerate(records) if i not in (1, 2))
    assert samples == expected


def test_ray_gives_exactly_the_in_process_samples(ray_local, synthetic_root, tmp_path):
    _, rows = _rows(synthetic_root)
    rows[4] = {**rows[4], "path": str(tmp_path / "missing.jpg")}
    expected = train_batch(
        rows_to_columns(rows), data=CFG.data, input_size=(128, 96), seed=CFG.train.seed, epoch=3
    )
    for blocks, batch_images in ((1, 16), (5, 2), (12, 5)):
        ds = train_crops(rows, CFG, 3, num_blocks=blocks, concurrency=2, batch_images=batch_images)
        got = ds.take_batch(100, batch_format="numpy")
        assert list(got) == list(SAMPLE_COLUMNS)
        for k in SAMPLE_COLUMNS:
            assert got[k].shape == expected[k].shape, k
            assert got[k].dtype == expected[k].dtype or k == "skip", k
            np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def test_crops_task_holds_opencv_to_the_reserved_cpus():
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)
        out = crops_task({}, make=lambda images: {"threads": cv2.getNumThreads()}, threads=1)
        assert out == {"threads": 1}
    finally:
        cv2.setNumThreads(before)


def test_model_actors_call_the_model_in_their_main_thread(ray_local):
    # in Ray Data's default second thread glibc gave each batch fresh pages (docs/benchmarks.md)
    import ray

    class _Thread:  # defined here: Ray pickles it by value (the workers cannot import tests)
        def __call__(self, batch: dict) -> dict:
            main = threading.current_thread() is threading.main_thread()
            return {"main": np.full(len(batch["id"]), main)}

    ds = ray.data.range(6, override_num_blocks=3).map_batches(
        _Thread, batch_size=2, compute=model_actors(1), num_cpus=0.5
    )
    assert [bool(r["main"]) for r in ds.take_all()] == [True] * 6


def test_the_detector_actor_imports_no_torch():
    # torch is ~1.2 s of a detector actor's start on 2 cores, beside the pose actor's own start
    code = "import sys, pipelines.detect; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
