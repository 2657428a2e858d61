"""Image row -> person samples, without Ray: counts, contents, skips and determinism."""

import numpy as np
import pytest

from pipelines.coco import load_coco_persons
from pipelines.samples import SAMPLE_COLUMNS, count_skips, eval_samples, image_rows, train_samples
from psm_model.config import DataConfig
from psm_model.geometry import transform_points

INPUT = (128, 96)


def _rows(root, split="train2017", for_training=True):
    records, _ = load_coco_persons(
        root / split, root / f"annotations/person_keypoints_{split}.json", INPUT, 1.25, for_training
    )
    return records, image_rows(records)


def test_rows_carry_every_person(synthetic_root):
    records, rows = _rows(synthetic_root)
    assert [r["image_id"] for r in rows] == [r.image_id for r in records]
    for rec, row in zip(records, rows, strict=True):
        assert row["keypoints"].shape == (len(rec.persons), 17, 3)
        assert row["centers"].shape == row["scales"].shape == (len(rec.persons), 2)
        assert np.all(row["scores"] == 1.0)


def test_train_samples_columns_and_sizes(synthetic_root):
    _, rows = _rows(synthetic_root)
    samples = train_samples(rows[0], data=DataConfig(), input_size=INPUT, seed=0, epoch=0)
    assert len(samples) == len(rows[0]["ann_ids"])
    s = samples[0]
    assert list(s) == list(SAMPLE_COLUMNS)
    assert s["image"].shape == (*INPUT, 3) and s["image"].dtype == np.uint8
    assert s["keypoints"].shape == (17, 2) and s["visible"].dtype == np.uint8
    assert s["skip"] == ""
    h, w = INPUT
    xy, vis = s["keypoints"], s["visible"].astype(bool)
    assert np.all((xy[vis] >= 0) & (xy[vis] < [w, h]))  # visible joints lie inside the crop
    assert np.all(xy[~vis] == 0)


def test_train_samples_are_seeded_by_epoch(synthetic_root):
    _, rows = _rows(synthetic_root)
    kw = dict(data=DataConfig(), input_size=INPUT, seed=0)
    a = train_samples(rows[1], epoch=0, **kw)
    b = train_samples(rows[1], epoch=0, **kw)
    c = train_samples(rows[1], epoch=1, **kw)
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    assert not any(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c, strict=True))


def test_eval_samples_map_gt_joints_into_the_crop(synthetic_root):
    records, rows = _rows(synthetic_root, "val2017", for_training=False)
    rec, row = records[0], rows[0]
    samples = eval_samples(row, input_size=INPUT, max_pixels=10**8)
    assert [s["ann_id"] for s in samples] == [p.ann_id for p in rec.persons]
    from psm_model.geometry import affine_matrix

    p = rec.persons[0]
    m = affine_matrix(p.center, p.scale, 0.0, INPUT)
    vis = p.keypoints[:, 2] > 0
    expected = transform_points(p.keypoints[vis, :2], m)
    np.testing.assert_allclose(samples[0]["keypoints"][vis], expected, atol=1e-3)
    # the box centre lands on the crop centre (w/2, h/2)
    np.testing.assert_allclose(
        transform_points(p.center, m), [INPUT[1] / 2, INPUT[0] / 2], atol=1e-4
    )


@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "missing_image"),
        (b"\xff\xd8\xff\xe0 not really a jpeg", "corrupt_image"),
        (b"random bytes", "corrupt_image"),
    ],
)
def test_bad_image_becomes_a_counted_skip_row(synthetic_root, tmp_path, content, reason):
    _, rows = _rows(synthetic_root)
    row = dict(rows[0])
    row["path"] = str(tmp_path / "bad.jpg")
    if content is not None:
        (tmp_path / "bad.jpg").write_bytes(content)
    out = train_samples(row, data=DataConfig(), input_size=INPUT, seed=0, epoch=0)
    assert len(out) == 1 and out[0]["skip"] == reason and out[0]["ann_id"] == -1
    assert out[0]["image"].shape == (*INPUT, 3)  # same shapes, so batches still stack
    assert count_skips([out[0]["skip"], "", reason]) == {reason: 2}


def test_decompression_bomb_guard(synthetic_root):
    _, rows = _rows(synthetic_root)
    out = train_samples(
        rows[0], data=DataConfig(max_image_pixels=1000), input_size=INPUT, seed=0, epoch=0
    )
    assert [s["skip"] for s in out] == ["too_large"]


def test_real_coco_train_sample_gives_86_samples(coco_root):
    records, skips = load_coco_persons(
        coco_root / "train2017",
        coco_root / "annotations/person_keypoints_train2017.json",
        (256, 192),
    )
    rows = image_rows(records)
    samples = [
        s
        for row in rows
        for s in train_samples(row, data=DataConfig(), input_size=(256, 192), seed=0, epoch=0)
    ]
    assert len(samples) == 86
    assert count_skips(s["skip"] for s in samples) == {}
    assert skips["crowd"] == 5
