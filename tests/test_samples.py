"""Image row -> person samples, without Ray: counts, contents, skips and determinism."""

import numpy as np
import pytest

from pipelines.coco import load_coco_persons
from pipelines.samples import (
    SAMPLE_COLUMNS,
    SampleRngs,
    count_skips,
    eval_batch,
    eval_samples,
    image_rows,
    rows_to_columns,
    sample_dicts,
    train_batch,
    train_samples,
)
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


def _assert_same_columns(a: dict, b: dict) -> None:
    assert list(a) == list(b) == list(SAMPLE_COLUMNS)
    for k in SAMPLE_COLUMNS:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _stack(samples: list[dict]) -> dict:
    return {k: np.array([s[k] for s in samples], dtype=object if k == "skip" else None)
            for k in SAMPLE_COLUMNS}  # fmt: skip


def _with_bad_images(rows, tmp_path):
    rows = list(rows)
    (tmp_path / "bad.jpg").write_bytes(b"random bytes")
    rows[2] = {**rows[2], "path": str(tmp_path / "bad.jpg")}
    rows[5] = {**rows[5], "path": str(tmp_path / "missing.jpg")}
    return rows


def test_batch_gives_exactly_the_per_row_samples(synthetic_root, tmp_path):
    _, rows = _rows(synthetic_root)
    rows = _with_bad_images(rows, tmp_path)
    kw = dict(data=DataConfig(), input_size=INPUT, seed=3, epoch=2)
    batch = train_batch(rows_to_columns(rows), **kw)
    per_row = [s for row in rows for s in train_samples(row, **kw)]
    assert sample_dicts(batch)[0].keys() == per_row[0].keys()
    _assert_same_columns(batch, _stack(per_row))
    assert count_skips(batch["skip"]) == {"corrupt_image": 1, "missing_image": 1}
    persons = [len(r["ann_ids"]) for r in rows]
    assert len(batch["skip"]) == sum(persons) - persons[2] - persons[5] + 2  # a skip row each
    h, w = INPUT
    assert batch["image"].shape[1:] == (h, w, 3) and batch["score"].dtype == np.float32
    assert not batch["image"][batch["skip"] != ""].any()  # skip rows: zero crops

    records, val = _rows(synthetic_root, "val2017", for_training=False)
    ev = eval_batch(rows_to_columns(val), input_size=INPUT, max_pixels=10**8)
    per_row = [s for row in val for s in eval_samples(row, input_size=INPUT, max_pixels=10**8)]
    _assert_same_columns(ev, _stack(per_row))
    assert ev["ann_id"].tolist() == [p.ann_id for r in records for p in r.persons]


def test_train_batch_is_the_same_whatever_the_batching(synthetic_root, tmp_path):
    _, rows = _rows(synthetic_root)
    rows = _with_bad_images(rows, tmp_path)
    kw = dict(data=DataConfig(), input_size=INPUT, seed=0, epoch=0)
    whole = train_batch(rows_to_columns(rows), **kw)
    for size in (1, 5):
        parts = [train_batch(rows_to_columns(rows[i : i + size]), **kw) for i in range(0, 12, size)]
        _assert_same_columns(whole, {k: np.concatenate([p[k] for p in parts]) for k in whole})
    reordered = train_batch(rows_to_columns(rows[::-1]), **kw)  # per-sample seeds: order free
    same = {
        (i, a): n for n, (i, a) in enumerate(zip(whole["image_id"], whole["ann_id"], strict=True))
    }
    for n, key in enumerate(zip(reordered["image_id"], reordered["ann_id"], strict=True)):
        np.testing.assert_array_equal(reordered["image"][n], whole["image"][same[key]])


def test_sample_rngs_give_one_stream_per_sample():
    rngs = SampleRngs(seed=0, epoch=1)
    a = rngs.for_sample(42, 7).random(6)
    rngs.for_sample(42, 8).random(3)  # another sample in between
    np.testing.assert_array_equal(rngs.for_sample(42, 7).random(6), a)
    np.testing.assert_array_equal(SampleRngs(0, 1).for_sample(42, 7).random(6), a)
    others = [
        SampleRngs(0, 1).for_sample(42, 8),
        SampleRngs(0, 1).for_sample(43, 7),
        SampleRngs(0, 2).for_sample(42, 7),
        SampleRngs(1, 1).for_sample(42, 7),
        SampleRngs(0, 1).for_sample(7, 42),
    ]
    assert all(not np.any(g.random(6) == a) for g in others)
    # first draws of neighbouring ids (neighbouring counters): uniform and uncorrelated
    u = np.concatenate([SampleRngs(0, 0).for_sample(i, 1).random(1) for i in range(4000)])
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert counts.min() > 320 and counts.max() < 480  # 400 expected, sd 19
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.06


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
