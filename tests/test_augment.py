"""Record -> sample, without Ray: the augmentation hand-computed (flip, half body, draws,
visibility), then image rows -> batch columns (counts, contents, skips and determinism)."""

import dataclasses

import cv2
import numpy as np
import pytest
from test_geometry import SIZE_HW, UNIT_SCALE, pose

from pipelines.augment import (
    SAMPLE_COLUMNS,
    Augmentation,
    ImageTable,
    SampleRngs,
    count_skips,
    draw_augmentation,
    half_body_box,
    image_rows,
    make_training_sample,
    rows_to_columns,
    sample_dicts,
    train_batch,
    train_samples,
)
from pipelines.coco import load_coco_persons
from psm_model.config import DataConfig
from psm_model.geometry import (
    affine_matrix,
    box_to_center_scale,
    flip_keypoints,
    transform_points,
    warp_crop,
)

INPUT = (128, 96)
NO_AUG = Augmentation(scale_factor=1.0, rotation_deg=0.0, flip=False, half_body=False)

# ---------------------------------------------------------------------------------------------
# one person: flip


@pytest.mark.parametrize("rot", [0.0, 33.0])
def test_mirrored_affine_equals_official_flip_then_crop(rot):
    """Official: fliplr the image, x -> W - 1 - x for joints and centre, crop. Ours: mirror folded
    into the crop matrix. The maps are equal; cv2 interpolates in fixed point (1/32 px steps,
    15-bit integer weights), and the mirrored path uses mirrored weights whose integer rounding can
    differ by one unit: measured, at most 1 level on < 0.05% of pixels, even on pure noise."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (180, 240, 3), dtype=np.uint8)
    kpts = pose({j: tuple(rng.uniform(40, 200, 2)) for j in range(17)})
    center, scale = np.array([110.3, 95.7]), np.array([0.9, 1.2])
    aug = Augmentation(scale_factor=1.0, rotation_deg=rot, flip=True, half_body=False)

    crop, xy, vis = make_training_sample(
        image, kpts, center, scale, DataConfig(), SIZE_HW, np.random.default_rng(0), aug
    )

    width = image.shape[1]
    ref_matrix = affine_matrix((width - 1 - center[0], center[1]), scale, rot, SIZE_HW)
    ref_crop = warp_crop(np.ascontiguousarray(np.fliplr(image)), ref_matrix, SIZE_HW)
    ref_xy = transform_points(flip_keypoints(kpts, width)[:, :2], ref_matrix)

    diff = np.abs(crop.astype(int) - ref_crop.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001
    ok = vis.astype(bool)
    assert ok.sum() > 10
    np.testing.assert_allclose(xy[ok], ref_xy[ok], atol=1e-3)


def test_training_flip_hand_computed():
    image = np.zeros((200, 200, 3), np.uint8)
    kpts = pose({9: (120.0, 90.0)})  # left wrist, right of the centre
    aug = Augmentation(scale_factor=1.0, rotation_deg=0.0, flip=True, half_body=False)
    _, xy, vis = make_training_sample(
        image,
        kpts,
        np.array([100.0, 100.0]),
        UNIT_SCALE,
        DataConfig(),
        SIZE_HW,
        np.random.default_rng(0),
        aug,
    )
    # mirrored x = 199 - 120 = 79, mirrored centre x = 99: crop x = 79 - 99 + 96 = 76
    assert vis[10] == 1 and vis[9] == 0
    np.testing.assert_allclose(xy[10], [76, 118])


# ---------------------------------------------------------------------------------------------
# half body


FULL_POSE = pose(
    {
        0: (50, 10),
        5: (40, 30),
        6: (60, 30),
        9: (30, 60),
        10: (70, 60),
        11: (45, 70),
        12: (55, 70),
        13: (45, 100),
        14: (55, 100),
        15: (45, 130),
        16: (55, 130),
    }
)


def test_half_body_box_upper_or_lower_hand_computed():
    aspect = 0.75
    seen = {}
    rng = np.random.default_rng(4)
    for _ in range(20):
        center, scale = half_body_box(FULL_POSE, rng, aspect)
        seen[tuple(np.round(center, 4))] = scale
    # upper: joints 0, 5, 6, 9, 10: mean (50, 38); box 40 x 50, wider than 0.75 * 50 = 37.5,
    # so h = 40 / 0.75 = 53.33; scale = (40, 53.33) / 200 * 1.5 = (0.3, 0.4)
    # lower: joints 11..16: mean (50, 100); box 10 x 60 -> w = 45; scale = (45, 60) * 1.5 / 200
    assert set(seen) == {(50.0, 38.0), (50.0, 100.0)}
    np.testing.assert_allclose(seen[(50.0, 38.0)], [0.3, 0.4], rtol=1e-6)
    np.testing.assert_allclose(seen[(50.0, 100.0)], [0.3375, 0.45], rtol=1e-6)


def test_half_body_equal_probability():
    rng = np.random.default_rng(5)
    upper = sum(half_body_box(FULL_POSE, rng, 0.75)[0][1] < 50 for _ in range(4000))
    assert 0.45 < upper / 4000 < 0.55


def test_half_body_fallbacks_as_official():
    rng = np.random.default_rng(6)
    only_lower = FULL_POSE.copy()
    only_lower[:11, 2] = 0
    assert all(half_body_box(only_lower, rng, 0.75)[0][1] == 100 for _ in range(20))
    # two upper joints (not > 2) and three lower: always the lower body
    few = pose({5: (40, 30), 6: (60, 30), 11: (45, 70), 12: (55, 70), 13: (45, 100)})
    assert all(half_body_box(few, rng, 0.75)[0][1] > 60 for _ in range(20))
    # one joint per group: official falls back to the upper body, which has < 2 joints -> None
    assert half_body_box(pose({0: (5, 5), 11: (6, 6)}), rng, 0.75) is None


def test_half_body_needs_more_than_min_visible_joints():
    cfg = dataclasses.replace(
        DataConfig(), half_body_prob=1.0, scale_min=1, scale_max=1, rotation_prob=0, flip=False
    )
    image = np.zeros((200, 200, 3), np.uint8)
    center, scale = np.array([50.0, 70.0]), UNIT_SCALE
    aug = Augmentation(1.0, 0.0, False, half_body=True)
    # FULL_POSE has 11 visible joints > 8: the crop is the half-body box, not the person box
    _, xy, _ = make_training_sample(
        image, FULL_POSE, center, scale, cfg, SIZE_HW, np.random.default_rng(0), aug
    )
    _, xy_plain, _ = make_training_sample(
        image, FULL_POSE, center, scale, cfg, SIZE_HW, np.random.default_rng(0), NO_AUG
    )
    assert not np.allclose(xy, xy_plain)
    eight = FULL_POSE.copy()
    eight[[0, 15, 16], 2] = 0  # 8 visible: not more than 8, no half body
    _, xy8, _ = make_training_sample(
        image, eight, center, scale, cfg, SIZE_HW, np.random.default_rng(0), aug
    )
    np.testing.assert_allclose(xy8[eight[:, 2] > 0], xy_plain[eight[:, 2] > 0])


# ---------------------------------------------------------------------------------------------
# augmentation draws, visibility, determinism


def test_joints_pushed_outside_the_crop_stay_labelled_as_official():
    image = np.zeros((400, 400, 3), np.uint8)
    kpts = pose(
        {0: (200.0, 200.0), 5: (200.0 + 96.0, 200.0), 6: (200.0 - 96.5, 150.0), 7: (190, 400)}
    )
    kpts[3] = (210.0, 210.0, 0)  # unlabelled
    _, xy, vis = make_training_sample(
        image,
        kpts,
        np.array([200.0, 200.0]),
        UNIT_SCALE,
        DataConfig(),
        SIZE_HW,
        np.random.default_rng(0),
        NO_AUG,
    )
    # as official (no crop test in __getitem__): where they land, weighed by the codec
    np.testing.assert_allclose(xy[[0, 5, 6, 7]], [[96, 128], [192, 128], [-0.5, 78], [86, 328]])
    assert vis[[0, 5, 6, 7]].tolist() == [1, 1, 1, 1]  # x = 192, x = -0.5, y = 328: outside
    assert vis[3] == 0 and tuple(xy[3]) == (0, 0)
    assert vis.dtype == np.uint8 and xy.dtype == np.float32


def test_draw_augmentation_ranges_and_rates():
    cfg = DataConfig()
    rng = np.random.default_rng(7)
    draws = [draw_augmentation(rng, cfg) for _ in range(3000)]
    scales = np.array([d.scale_factor for d in draws])
    rots = np.array([d.rotation_deg for d in draws])
    assert cfg.scale_min <= scales.min() and scales.max() <= cfg.scale_max
    assert (
        np.abs(rots).max() <= cfg.rotation and np.abs(rots).max() > 40
    )  # uniform reaches the edge
    assert 0.55 < (rots != 0).mean() < 0.65  # rotation_prob 0.6
    assert 0.45 < np.mean([d.flip for d in draws]) < 0.55
    assert 0.25 < np.mean([d.half_body for d in draws]) < 0.35
    no_flip = dataclasses.replace(cfg, flip=False)
    assert not any(draw_augmentation(rng, no_flip).flip for _ in range(100))


def test_same_seed_same_sample_other_seed_differs():
    image = cv2.GaussianBlur(
        np.random.default_rng(8).integers(0, 256, (240, 320, 3), np.uint8), (5, 5), 0
    )
    center, scale = box_to_center_scale((100, 40, 80, 160), aspect=192 / 256, padding=1.25)

    def sample(seed):
        rng = np.random.default_rng([seed, 3, 42, 7])  # (seed, epoch, image id, annotation id)
        return make_training_sample(
            image, FULL_POSE + [100, 40, 0], center, scale, DataConfig(), SIZE_HW, rng
        )

    a, b, c = sample(0), sample(0), sample(1)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0]) and not np.allclose(a[1], c[1])


def test_crops_warp_into_a_given_batch_row():
    image = cv2.GaussianBlur(
        np.random.default_rng(9).integers(0, 256, (240, 320, 3), np.uint8), (5, 5), 0
    )
    center, scale = box_to_center_scale((100, 40, 80, 160), aspect=192 / 256, padding=1.25)
    batch = np.zeros((3, *SIZE_HW, 3), np.uint8)
    kw = dict(cfg_data=DataConfig(), input_size_hw=SIZE_HW)
    crop, xy, vis = make_training_sample(
        image, FULL_POSE + [100, 40, 0], center, scale, rng=np.random.default_rng(1), **kw
    )
    into = make_training_sample(
        image,
        FULL_POSE + [100, 40, 0],
        center,
        scale,
        rng=np.random.default_rng(1),
        out=batch[1],
        **kw,
    )
    assert np.shares_memory(into[0], batch)
    np.testing.assert_array_equal(batch[1], crop)
    np.testing.assert_array_equal(into[1], xy)
    assert not batch[0].any() and not batch[2].any()


# ---------------------------------------------------------------------------------------------
# image rows -> batch columns


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


def test_an_image_table_gives_every_row_from_a_few_shared_arrays(synthetic_root):
    """What a training job's workers read from Ray's object store: the rows of the records, a
    view of them in any order, and nothing per row in the pickle (numpy buffers out of band,
    so the workers map one copy instead of each parsing the annotations)."""
    import pickle

    records, _ = _rows(synthetic_root)
    table = ImageTable.from_records(records)
    assert len(table) == len(records) and table.persons == sum(len(r.persons) for r in records)
    for rec, row in zip(records, table, strict=True):
        assert row["image_id"] == rec.image_id and row["path"] == rec.path
        np.testing.assert_array_equal(row["ann_ids"], [p.ann_id for p in rec.persons])
        np.testing.assert_array_equal(
            row["keypoints"], np.array([p.keypoints for p in rec.persons]).reshape(-1, 17, 3)
        )
        np.testing.assert_allclose(
            row["centers"], np.reshape([p.center for p in rec.persons], (-1, 2))
        )
    order = [3, 0, 2]
    view = table.view(order).view([2, 0])  # a view of a view: rows 2 and 3 of the table
    assert [r["image_id"] for r in view] == [records[2].image_id, records[3].image_id]
    assert view.persons == len(records[2].persons) + len(records[3].persons)
    assert [r["image_id"] for r in view[0:1]] == [records[2].image_id]
    buffers = []
    inline = pickle.dumps(view, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 9 and len(inline) < 1500  # the arrays, and a small frame around them


def test_train_samples_columns_and_sizes(synthetic_root):
    _, rows = _rows(synthetic_root)
    samples = train_samples(rows[0], data=DataConfig(), input_size=INPUT, seed=0, epoch=0)
    assert len(samples) == len(rows[0]["ann_ids"])
    s = samples[0]
    assert list(s) == list(SAMPLE_COLUMNS)
    assert s["image"].shape == (*INPUT, 3) and s["image"].dtype == np.uint8
    assert s["keypoints"].shape == (17, 2) and s["visible"].dtype == np.uint8
    assert s["skip"] == ""
    xy, vis = s["keypoints"], s["visible"].astype(bool)
    labelled = rows[0]["keypoints"][0][:, 2] > 0
    # every labelled joint stays labelled, inside the crop or not (counted: a flip swaps sides)
    assert vis.sum() == labelled.sum() and np.all(xy[~vis] == 0)


def test_train_samples_are_seeded_by_epoch(synthetic_root):
    _, rows = _rows(synthetic_root)
    kw = dict(data=DataConfig(), input_size=INPUT, seed=0)
    a = train_samples(rows[1], epoch=0, **kw)
    b = train_samples(rows[1], epoch=0, **kw)
    c = train_samples(rows[1], epoch=1, **kw)
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    assert not any(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c, strict=True))


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
    return {
        k: np.array([s[k] for s in samples], dtype=object if k == "skip" else None)
        for k in SAMPLE_COLUMNS
    }


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
