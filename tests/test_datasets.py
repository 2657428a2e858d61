"""The Ray Data graphs on a local Ray: sharding, determinism across worker counts, skips."""

from collections import Counter

import numpy as np

from pipelines.coco import load_coco_persons
from pipelines.datasets import eval_crops, train_crops
from pipelines.samples import count_skips, image_rows
from psm_model.config import load_config

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


def test_eval_crops_cover_every_ground_truth_person(ray_local, synthetic_root):
    records, rows = _rows(synthetic_root, "val2017", for_training=False)
    out = eval_crops(rows, CFG, concurrency=2).take_all()
    assert [(s["image_id"], s["ann_id"]) for s in out] == [
        (r.image_id, p.ann_id) for r in records for p in r.persons
    ]
    assert all(s["score"] == 1.0 and s["skip"] == "" for s in out)
