"""Record -> training sample: the one mapper from COCO person records to the columns of a batch,
the second of a sample's four hops (docs/architecture.md). No Ray here: `pipelines.datasets` maps
`train_batch` over blocks of `image_rows`; `pipelines.eval_crops` is the same without augmentation.

`train_batch` decodes each image once (`pipelines.images`); per person, `make_training_sample`
draws from a generator of its own (`SampleRngs`), then applies half body, scale, rotation and flip
in the official order in one warpAffine straight into the batch array. A sample (SAMPLE_COLUMNS)
is about 0.33 MB at 384x288 through the object store: the uint8 crop, joints in crop pixels;
normalisation and targets are made batched in torch, in the train step.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.coco import ImageRecord
from pipelines.images import ImageError, decode_image
from psm_model.coco_keypoints import NUM_JOINTS, UPPER_BODY_JOINTS
from psm_model.config import DataConfig
from psm_model.geometry import PIXEL_STD, affine_matrix, flip_permutation, warp_crop

# Images per `train_batch` / `eval_batch` call (one Ray task each) in the Ray Data graphs
# (`pipelines.datasets`): fewer, larger tasks amortise Ray's per-task cost (measured in
# docs/benchmarks.md); 32 COCO images hold ~85 persons, 28 MB of crops at 384x288.
BATCH_IMAGES = 32

# The one place that names the sample columns (and their per-row shapes / dtypes).
SAMPLE_COLUMNS = {
    "image": "uint8 (H, W, 3) RGB crop",
    "keypoints": f"float32 ({NUM_JOINTS}, 2) x, y in crop pixels, maybe outside it (0 if v = 0)",
    "visible": f"uint8 ({NUM_JOINTS},) 1 = labelled, inside the crop or not",
    "image_id": "int64",
    "ann_id": "int64 (annotation id, or the detection's index in its image)",
    "center": "float32 (2,) crop centre in image pixels",
    "scale": "float32 (2,) crop size / 200 (pixel_std), padding included",
    "score": "float32 box score (1 for ground-truth boxes)",
    "skip": "str: '' for a sample, else why this image gave none (ImageError.reason)",
}

_FLIP_PERM = flip_permutation()  # COCO's 17 joints: made once, used by every flipped sample


def image_rows(
    records: Sequence[ImageRecord], scores: Sequence[np.ndarray] | None = None
) -> list[dict]:
    """One row per image for Ray Data, its persons' metadata as arrays; `scores`: each image's box
    scores (detections), else 1 (ground-truth boxes)."""
    return list(ImageTable.from_records(records, scores))


@dataclass(frozen=True)
class ImageTable(Sequence):
    """`image_rows` as a few flat arrays: what a training job parses once on the driver and its
    workers read from Ray's object store without a copy (COCO train: 118k images and 254k
    persons are ~70 MB here, ~1.4 GB as records). Indexing gives `image_rows`' dicts, made only
    for the rows asked for; `view(order)` picks and orders rows without copying any."""

    image_id: np.ndarray  # (N,) int64
    path: np.ndarray  # (N,) fixed-width UTF-8 bytes: one buffer, not N Python strings
    first: np.ndarray  # (N + 1,) int64: image i's persons are [first[i], first[i + 1])
    ann_ids: np.ndarray  # (P,) int64
    keypoints: np.ndarray  # (P, 17, 3) float32
    centers: np.ndarray  # (P, 2) float32
    scales: np.ndarray  # (P, 2) float32
    scores: np.ndarray  # (P,) float32
    order: np.ndarray | None = None  # the rows shown, in this order (None: all)

    @classmethod
    def from_records(
        cls, records: Sequence[ImageRecord], scores: Sequence[np.ndarray] | None = None
    ) -> ImageTable:
        persons = [p for r in records for p in r.persons]
        counts = np.array([len(r.persons) for r in records], np.int64)
        return cls(
            image_id=np.array([r.image_id for r in records], np.int64),
            path=np.array([r.path.encode() for r in records], np.bytes_),
            first=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            ann_ids=np.array([p.ann_id for p in persons], np.int64),
            keypoints=np.array([p.keypoints for p in persons], np.float32).reshape(
                -1, NUM_JOINTS, 3
            ),
            centers=np.array([p.center for p in persons], np.float32).reshape(-1, 2),
            scales=np.array([p.scale for p in persons], np.float32).reshape(-1, 2),
            scores=np.ones(len(persons), np.float32)
            if scores is None
            else np.concatenate(
                [np.zeros(0, np.float32), *(np.asarray(s, np.float32).reshape(-1) for s in scores)]
            ),
        )

    def __len__(self) -> int:
        return len(self.image_id) if self.order is None else len(self.order)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self._row(i) for i in range(*k.indices(len(self)))]
        return self._row(range(len(self))[k])

    def _row(self, k: int) -> dict:
        i = int(k if self.order is None else self.order[k])
        a, b = self.first[i], self.first[i + 1]
        return {
            "image_id": int(self.image_id[i]),
            "path": self.path[i].decode(),
            "ann_ids": self.ann_ids[a:b].copy(),
            "keypoints": self.keypoints[a:b].copy(),
            "centers": self.centers[a:b].copy(),
            "scales": self.scales[a:b].copy(),
            "scores": self.scores[a:b].copy(),
        }

    @property
    def persons(self) -> int:
        counts = np.diff(self.first)
        return int(counts.sum() if self.order is None else counts[self.order].sum())

    def view(self, order: Sequence[int] | np.ndarray) -> ImageTable:
        """These rows, in this order (indices into this view)."""
        rows = np.asarray(order, np.int64)
        if self.order is not None:
            rows = self.order[rows]
        return dataclasses.replace(self, order=rows)


def train_batch(
    images: Mapping[str, Sequence],
    *,
    data: DataConfig,
    input_size: tuple[int, int],
    seed: int,
    epoch: int,
) -> dict[str, np.ndarray]:
    """Image rows (as columns, as Ray Data's numpy batches hold them) -> every person's augmented
    sample (SAMPLE_COLUMNS), in row order; an image that cannot be decoded gives one skip row.
    Each sample draws from its own generator (`SampleRngs`), so the samples are the same whatever
    the batching, number or order of workers."""
    rngs = SampleRngs(seed, epoch)
    out = BatchColumns(images, input_size)
    for row in columns_to_rows(images):
        try:
            image = decode_image(row["path"], data.max_image_pixels)
        except ImageError as e:
            out.add_skip(row, e.reason)
            continue
        image_id = int(row["image_id"])
        for k, ann_id in enumerate(row["ann_ids"]):
            i = out.next_index()
            _, xy, visible = make_training_sample(
                image,
                row["keypoints"][k],
                row["centers"][k],
                row["scales"][k],
                data,
                input_size,
                rngs.for_sample(image_id, int(ann_id)),
                out=out.image[i],
            )
            out.add_person(row, k, xy, visible)
    return out.columns()


def make_training_sample(
    image: np.ndarray,
    person_keypoints: np.ndarray,
    center: np.ndarray,
    scale: np.ndarray,
    cfg_data: DataConfig,
    input_size_hw: tuple[int, int],
    rng: np.random.Generator,
    augmentation: Augmentation | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One augmented person crop: (crop HxWx3 uint8, keypoints (J, 2) float32 in crop pixels,
    visible (J,) uint8); `out` receives the crop (`warp_crop`).

    Order as official: half body, scale, rotation, flip, then one warpAffine; the official flip
    ("mirror the image and the centre, crop") is folded into the matrix, so the image is never
    copied. `augmentation` replaces the drawn one (tests); the half-body choice still comes from
    `rng`. Unlabelled joints get visible 0 and (0, 0); labelled ones stay visible wherever they
    land, as official (no crop test in `__getitem__`): `psm_model.loss.render_targets` weighs them.
    """
    kpts = np.asarray(person_keypoints, dtype=np.float64)
    aug = draw_augmentation(rng, cfg_data) if augmentation is None else augmentation
    out_h, out_w = input_size_hw
    visible = kpts[:, 2] > 0

    c, s = center, scale
    if aug.half_body and np.count_nonzero(visible) > cfg_data.half_body_min_joints:
        box = half_body_box(kpts, rng, aspect=out_w / out_h)
        if box is not None:
            c, s = box
    s = (float(s[0]) * aug.scale_factor, float(s[1]) * aug.scale_factor)

    if aug.flip:
        # crop(mirror(x)) with mirror x' = width - 1 - x and the centre mirrored: negate the
        # x column of the crop matrix and move its translation by width - 1 along it
        width_1 = image.shape[1] - 1.0
        matrix = affine_matrix(
            (width_1 - float(c[0]), float(c[1])), s, aug.rotation_deg, input_size_hw
        )
        matrix[:, 2] += matrix[:, 0] * width_1
        matrix[:, 0] *= -1.0
    else:
        matrix = affine_matrix(c, s, aug.rotation_deg, input_size_hw)

    crop = warp_crop(image, matrix, input_size_hw, out)
    xy = kpts[:, :2] @ matrix[:, :2].T + matrix[:, 2]
    if aug.flip:  # the mirror is in the matrix; the joint names still have to swap sides
        perm = _FLIP_PERM if len(kpts) == len(_FLIP_PERM) else flip_permutation(len(kpts))
        xy, visible = xy[perm], visible[perm]
    xy[~visible] = 0.0
    return crop, xy.astype(np.float32), visible.view(np.uint8)


@dataclass(frozen=True)
class Augmentation:
    scale_factor: float  # multiplies the box scale: > 1 zooms out
    rotation_deg: float  # counter-clockwise, as `affine_matrix`
    flip: bool
    half_body: bool  # try a half-body box (applied only to persons with enough visible joints)


def draw_augmentation(rng: np.random.Generator, cfg: DataConfig) -> Augmentation:
    """One person's augmentation, drawn from `rng` only, every draw made whatever the config (a
    fixed number of draws). HRNet draws clipped normals (scale 1 + 0.35 N(0,1) clipped to [0.65,
    1.35]; rotation 45 N(0,1) clipped to +-90 deg); we draw uniformly in the paper's ranges: scale
    in [scale_min, scale_max], rotation in [-rotation, rotation] with probability rotation_prob.
    """
    # one call for the five uniforms: the same values, in the same order, as five scalar draws
    # (rng.uniform(a, b) is a + (b - a) * rng.random()), at the cost of one
    u_half, u_scale, u_rotate, u_rotation, u_flip = rng.random(5).tolist()
    rotation = -cfg.rotation + 2 * cfg.rotation * u_rotation
    return Augmentation(
        scale_factor=cfg.scale_min + (cfg.scale_max - cfg.scale_min) * u_scale,
        rotation_deg=rotation if u_rotate < cfg.rotation_prob else 0.0,
        flip=u_flip < 0.5 and cfg.flip,
        half_body=u_half < cfg.half_body_prob,
    )


def half_body_box(
    keypoints: np.ndarray, rng: np.random.Generator, aspect: float, padding: float = 1.5
) -> tuple[np.ndarray, np.ndarray] | None:
    """(centre, scale) of a box around the upper or the lower body, or None if too few joints.

    The official selection, but with a fair coin (`rng.random() < 0.5`) where the official
    `randn() < 0.5` picks the upper body ~69% of the time: the chosen group if it has more than 2
    visible joints, else the lower body if it has more than 2, else the upper body; fewer than 2
    joints give None. Centre: the joints' mean (not the box middle); box grown to `aspect` (w / h),
    then x1.5."""
    kpts = np.asarray(keypoints, dtype=np.float64)
    visible = kpts[:, 2] > 0
    is_upper = np.zeros(len(kpts), dtype=bool)
    is_upper[list(UPPER_BODY_JOINTS)] = True
    upper, lower = kpts[visible & is_upper, :2], kpts[visible & ~is_upper, :2]
    # one draw, always, so the stream of later draws does not depend on the pose
    want_upper = rng.random() < 0.5
    if want_upper and len(upper) > 2:
        chosen = upper
    else:
        chosen = lower if len(lower) > 2 else upper
    if len(chosen) < 2:
        return None
    center = chosen.mean(axis=0)
    w, h = chosen.max(axis=0) - chosen.min(axis=0)
    if w > aspect * h:
        h = w / aspect
    elif w < aspect * h:
        w = h * aspect
    scale = np.array([w, h]) / PIXEL_STD * padding
    return center.astype(np.float32), scale.astype(np.float32)


class SampleRngs:
    """One generator per sample, keyed by (seed, epoch, image id, annotation id). Philox is
    counter based: keyed by (seed, epoch), a sample's stream starts at the counter (0, 0, image id,
    annotation id), so distinct samples get disjoint streams (each would need 2^128 draws to reach
    the next). Re-keying one generator is cheaper than `np.random.default_rng([seed, epoch, image,
    ann])` per sample; `for_sample` returns that same Generator, set to the sample's stream start:
    use it before asking for the next sample's."""

    def __init__(self, seed: int, epoch: int) -> None:
        self._key = _uint64([seed, epoch])
        self._bits = np.random.Philox(key=self._key)
        self._generator = np.random.Generator(self._bits)

    def for_sample(self, image_id: int, ann_id: int) -> np.random.Generator:
        self._bits.state = {
            "bit_generator": "Philox",
            "state": {"counter": _uint64([0, 0, image_id, ann_id]), "key": self._key},
            "buffer": np.zeros(4, np.uint64),
            "buffer_pos": 4,  # buffer empty: the first draw computes block (counter + 1)
            "has_uint32": 0,
            "uinteger": 0,
        }
        return self._generator


def train_samples(
    row: dict, *, data: DataConfig, input_size: tuple[int, int], seed: int, epoch: int
) -> list[dict]:
    """One image row -> its samples as dicts (`train_batch` of one row; tests, notebooks)."""
    batch = train_batch(
        rows_to_columns([row]), data=data, input_size=input_size, seed=seed, epoch=epoch
    )
    return sample_dicts(batch)


def rows_to_columns(rows: Sequence[dict]) -> dict[str, list]:
    """Image rows (`image_rows`) -> the column mapping `train_batch` / `eval_batch` take."""
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def sample_dicts(batch: Mapping[str, np.ndarray]) -> list[dict]:
    """Columns of samples -> one dict per sample (views, not copies)."""
    return [{k: batch[k][i] for k in SAMPLE_COLUMNS} for i in range(len(batch["skip"]))]


def count_skips(skip_column: Iterable[str]) -> Counter:
    """Skip reasons in a batch's `skip` column ('' marks a real sample)."""
    return Counter(s for s in skip_column if s)


class BatchColumns:
    """The output columns of one batch, allocated once for the most rows the images can give
    (each person, or one skip row per image); crops are warped straight into `image`."""

    def __init__(self, images: Mapping[str, Sequence], input_size: tuple[int, int]) -> None:
        cap = sum(max(1, len(a)) for a in images.get("ann_ids", ()))
        self.image = np.empty((cap, *input_size, 3), np.uint8)
        self.keypoints = np.zeros((cap, NUM_JOINTS, 2), np.float32)
        self.visible = np.zeros((cap, NUM_JOINTS), np.uint8)
        self.image_id = np.zeros(cap, np.int64)
        self.ann_id = np.full(cap, -1, np.int64)
        self.center = np.zeros((cap, 2), np.float32)
        self.scale = np.zeros((cap, 2), np.float32)
        self.score = np.zeros(cap, np.float32)
        self.skip: list[str] = []

    def next_index(self) -> int:
        return len(self.skip)

    def add_person(self, row: dict, k: int, xy: np.ndarray, visible: np.ndarray) -> None:
        i = len(self.skip)
        self.keypoints[i] = xy
        self.visible[i] = visible
        self.image_id[i] = row["image_id"]
        self.ann_id[i] = row["ann_ids"][k]
        self.center[i] = row["centers"][k]
        self.scale[i] = row["scales"][k]
        self.score[i] = row["scores"][k]
        self.skip.append("")

    def add_skip(self, row: dict, reason: str) -> None:
        # a row, not an exception: the epoch goes on and the count travels with the data;
        # zero crop and keypoints, ann_id -1, same shapes, so batches still stack
        i = len(self.skip)
        self.image[i] = 0
        self.image_id[i] = row["image_id"]
        self.skip.append(reason)

    def columns(self) -> dict[str, np.ndarray]:
        n = len(self.skip)  # prefixes of C-contiguous arrays: no copies
        cols = {name: getattr(self, name)[:n] for name in SAMPLE_COLUMNS}
        cols["skip"] = np.array(self.skip, dtype=object)
        return cols


def _uint64(values: list[int]) -> np.ndarray:
    return np.array(values, np.int64).view(np.uint64)  # two's complement: -1 is a valid key too


def columns_to_rows(images: Mapping[str, Sequence]) -> Iterator[dict]:
    names = list(images)
    for i in range(len(images[names[0]]) if names else 0):
        yield {k: images[k][i] for k in names}
