"""A synthetic COCO person-keypoints set: stick figures on cluttered backgrounds, in COCO's schema.

For the demo and the tests, where real COCO is absent: the same loader, pipeline and COCOeval run on
it unchanged. Each image holds 1-4 people (25-90 % of the image height) with random limb angles,
torso lean and body tilt, front or back view. Left and right limbs have different colours, as a
person's side is otherwise ambiguous in a flat drawing (COCO's left is the person's left: on the
image right for a front view). Annotations follow COCO's rules: keypoints outside the image are
(0, 0, v=0); keypoints covered by a later person, an occluding rectangle, or (back view) the face
seen from behind are v=1; the rest v=2. `bbox` is the tight box of the drawn figure, clipped to
the image; `area` is 0.6 x the box area - COCO's `area` is the segment area, which COCOeval uses as
the OKS scale, and a real person's mask covers roughly 0.6 of its box (a stick figure's pixels
would make OKS several times too strict).

Every image draws from its own generator seeded by (seed, split, index): deterministic, and
independent of how many images the other split has.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

from psm_model.coco_keypoints import KEYPOINT_NAMES, SKELETON
from psm_model.config import Config
from psm_model.files import write_atomic

PERSON_CATEGORY = {
    "supercategory": "person",
    "id": 1,
    "name": "person",
    "keypoints": list(KEYPOINT_NAMES),
    "skeleton": SKELETON,
}
SPLITS = ("train2017", "val2017")
IMAGE_SIZE_RANGE = ((240, 320), (480, 640))  # ((min height, min width), (max height, max width))
IMAGE_ID_STRIDE = 1_000_000  # val ids start at 1_000_001: ids stay unique across splits, as COCO's
MAX_PERSONS = 4
JPEG_QUALITY = 90
AREA_FRACTION = 0.6  # see the module docstring

# Limbs drawn as (from joint, to joint, RGB). Left: warm colours; right: cold; centre: grey.
LIMBS = (
    (11, 13, (230, 40, 40)),
    (13, 15, (255, 120, 150)),  # left thigh, shin
    (12, 14, (40, 170, 60)),
    (14, 16, (150, 255, 120)),  # right thigh, shin
    (5, 11, (170, 90, 0)),
    (6, 12, (0, 80, 160)),  # torso sides: left, right
    (5, 6, (235, 235, 235)),
    (11, 12, (200, 200, 200)),  # shoulder line, hip line
    (5, 7, (255, 128, 0)),
    (7, 9, (255, 215, 0)),  # left upper arm, forearm
    (6, 8, (0, 110, 255)),
    (8, 10, (0, 220, 255)),  # right upper arm, forearm
)
EAR_COLOURS = {3: (255, 150, 60), 4: (60, 150, 255)}  # left ear warm, right ear cold
SKIN_TONES = ((255, 219, 172), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36))
FACE_JOINTS = (0, 1, 2)  # nose and eyes: hidden from behind


def _down(angle: float) -> np.ndarray:
    """Unit vector pointing down the image, rotated by `angle` radians (positive: towards -x)."""
    return np.array([-np.sin(angle), np.cos(angle)])


def _pose(rng: np.random.Generator, height: float, hip: np.ndarray) -> tuple[np.ndarray, dict]:
    """(17, 2) keypoints of one random, plausible pose, and what else is needed to draw it."""
    deg = np.pi / 180
    tilt = rng.normal(0, 6) * deg  # whole body
    lean = tilt + np.clip(rng.normal(0, 12), -30, 30) * deg  # torso only
    facing = 1.0 if rng.random() < 0.75 else -1.0  # front view: the person's left is image right
    head_r = 0.065 * height
    kp = np.zeros((17, 2))

    up_torso = -_down(lean)
    side_hips, side_torso = _down(tilt - np.pi / 2), _down(lean - np.pi / 2)  # image +x if upright
    shoulders = hip + 0.30 * height * up_torso
    head = shoulders + 0.14 * height * -_down(lean + rng.normal(0, 8) * deg)
    kp[5], kp[6] = shoulders + facing * 0.11 * height * side_torso * np.array([[1], [-1]])
    kp[11], kp[12] = hip + facing * 0.07 * height * side_hips * np.array([[1], [-1]])

    for shoulder, elbow, wrist, side in ((5, 7, 9, 1), (6, 8, 10, -1)):
        outward = -facing * side  # rotating 'down' by a positive angle moves it towards -x
        a1 = lean + outward * rng.uniform(-20, 170) * deg
        a2 = a1 + outward * rng.uniform(-120, 120) * deg
        kp[elbow] = kp[shoulder] + 0.17 * height * _down(a1)
        kp[wrist] = kp[elbow] + 0.15 * height * _down(a2)
    for hip_j, knee, ankle, side in ((11, 13, 15, 1), (12, 14, 16, -1)):
        outward = -facing * side
        a1 = tilt + outward * rng.uniform(-15, 50) * deg
        a2 = a1 - outward * rng.uniform(-10, 90) * deg
        kp[knee] = kp[hip_j] + 0.24 * height * _down(a1)
        kp[ankle] = kp[knee] + 0.23 * height * _down(a2)

    # face in the head disc: eyes above centre, nose below, ears at the rim; yaw shifts the face
    yaw = rng.uniform(-0.3, 0.3) * head_r * side_torso
    up_r, side_r = head_r * up_torso, facing * head_r * side_torso
    kp[0] = head - 0.15 * up_r + yaw
    kp[1], kp[2] = head + 0.25 * up_r + yaw + 0.4 * side_r * np.array([[1], [-1]])
    kp[3], kp[4] = head + 0.1 * up_r + 0.75 * side_r * np.array([[1], [-1]])
    thickness = max(2, round(0.035 * height))
    return kp, {"head": head, "head_r": head_r, "facing": facing, "thickness": thickness}


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A colour gradient in a random direction, plus random shapes as clutter."""
    c0, c1 = rng.uniform(0, 255, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xs * np.cos(angle) + ys * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    image = (c0 + t[..., None] * (c1 - c0)).astype(np.uint8)  # (h, w, 3)
    for _ in range(rng.integers(3, 10)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        size = int(rng.integers(min(h, w) // 20, min(h, w) // 4))
        kind = rng.integers(3)
        if kind == 0:
            cv2.rectangle(image, (x, y), (x + size, y + size // 2), colour, -1)
        elif kind == 1:
            cv2.circle(image, (x, y), size // 2, colour, -1, cv2.LINE_AA)
        else:
            end = (x + int(rng.integers(-size, size)), y + int(rng.integers(-size, size)))
            cv2.line(image, (x, y), end, colour, int(rng.integers(1, 6)), cv2.LINE_AA)
    return image


_SHIFT = 4  # cv2 draws at 1/16 pixel: figures land where their (sub-pixel) keypoints say
_ONE = 1 << _SHIFT


def _fixed(point: np.ndarray) -> tuple[int, int]:
    return round(point[0] * _ONE), round(point[1] * _ONE)


def _draw_person(
    image: np.ndarray, mask: np.ndarray, label: int, kp: np.ndarray, part: dict, rng
) -> None:
    """Draw on `image` and, with the same primitives, fill `label` into the occlusion `mask`."""
    t, r = part["thickness"], part["head_r"]
    jitter = rng.integers(-20, 21)  # per-person brightness: colour families stay apart
    for a, b, colour in LIMBS:
        colour = tuple(int(np.clip(c + jitter, 0, 255)) for c in colour)
        cv2.line(image, _fixed(kp[a]), _fixed(kp[b]), colour, t, cv2.LINE_AA, _SHIFT)
        cv2.line(mask, _fixed(kp[a]), _fixed(kp[b]), label, t, cv2.LINE_8, _SHIFT)
    neck = (kp[5] + kp[6]) / 2
    cv2.line(image, _fixed(neck), _fixed(part["head"]), (190, 190, 190), t, cv2.LINE_AA, _SHIFT)
    cv2.line(mask, _fixed(neck), _fixed(part["head"]), label, t, cv2.LINE_8, _SHIFT)
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))]
    cv2.circle(image, _fixed(part["head"]), round(_ONE * r), skin, -1, cv2.LINE_AA, _SHIFT)
    cv2.circle(mask, _fixed(part["head"]), round(_ONE * r), label, -1, cv2.LINE_8, _SHIFT)
    for j in range(17):  # blobs: each keypoint's own pixel belongs to its figure until covered
        cv2.circle(mask, _fixed(kp[j]), _ONE * max(1, t // 2), label, -1, cv2.LINE_8, _SHIFT)
    dot = max(1.0, 0.12 * r)
    for j, colour in EAR_COLOURS.items():
        cv2.circle(image, _fixed(kp[j]), round(_ONE * dot), colour, -1, cv2.LINE_AA, _SHIFT)
    if part["facing"] > 0:  # face dots only when the face is seen
        for j, colour in ((1, (20, 20, 20)), (2, (20, 20, 20)), (0, (200, 60, 60))):
            cv2.circle(image, _fixed(kp[j]), round(_ONE * dot), colour, -1, cv2.LINE_AA, _SHIFT)


def _figure_box(kp: np.ndarray, part: dict) -> np.ndarray:
    """(x0, y0, x1, y1) of everything drawn: limbs with their thickness, and the head disc."""
    margin = part["thickness"] / 2 + 1
    lo = np.minimum(kp[5:].min(0) - margin, part["head"] - part["head_r"])
    hi = np.maximum(kp[5:].max(0) + margin, part["head"] + part["head_r"])
    return np.concatenate([lo, hi])


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, list]:
    """RGB image (height, width, 3) and its persons as [(keypoints (17, 3), box xyxy)]."""
    image = _background(rng, height, width)
    mask = np.zeros((height, width), np.uint8)  # who is on top at each pixel: 0 none, k person k
    people = []
    for _ in range(rng.integers(1, MAX_PERSONS + 1)):
        size = rng.uniform(0.25, 0.9) * height
        for _try in range(20):  # re-place a person with too few keypoints inside the image
            hip = np.array([rng.uniform(0.05, 0.95) * width, rng.uniform(0.4, 0.8) * height])
            kp, part = _pose(rng, size, hip)
            inside = (kp >= 0).all(1) & (kp[:, 0] <= width - 1) & (kp[:, 1] <= height - 1)
            if inside.sum() >= 6:
                break
        people.append((size, kp, part, inside))
    people.sort(key=lambda p: p[0])  # smaller = farther away: drawn first, so occluded by others
    for label, (_, kp, part, _) in enumerate(people, start=1):
        _draw_person(image, mask, label, kp, part, rng)
    for _ in range(rng.integers(0, 3) if rng.random() < 0.35 else 0):  # occluding rectangles
        w, h = int(rng.uniform(0.1, 0.3) * width), int(rng.uniform(0.1, 0.4) * height)
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.rectangle(image, (x, y), (x + w, y + h), colour, -1)
        mask[y : y + h + 1, x : x + w + 1] = 255
    noise = rng.integers(-8, 9, image.shape, dtype=np.int16)  # sensor-like, over everything
    image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)

    persons = []
    for label, (_, kp, part, inside) in enumerate(people, start=1):
        px = np.round(kp[inside]).astype(int)
        seen = np.zeros(17, bool)
        seen[inside] = mask[px[:, 1], px[:, 0]] == label
        if part["facing"] < 0:
            seen[list(FACE_JOINTS)] = False
        v = np.where(inside, np.where(seen, 2, 1), 0)
        keypoints = np.where(inside[:, None], np.column_stack([kp, v]), 0.0)  # COCO: v=0 -> (0, 0)
        box = _figure_box(kp, part).clip(0, [width, height, width, height])
        persons.append((keypoints, box))
    return image, persons


def write_split(
    out_dir: str | os.PathLike,
    split: str,
    num_images: int,
    seed: int = 0,
    image_size_range: tuple[tuple[int, int], tuple[int, int]] = IMAGE_SIZE_RANGE,
) -> dict[str, int]:
    """Write `out_dir/{split}/*.jpg` and `out_dir/annotations/person_keypoints_{split}.json`."""
    if split not in SPLITS:  # the split's index seeds its images and offsets its ids
        raise ValueError(f"split: {split!r} is not one of {SPLITS}")
    split_index = SPLITS.index(split)
    (min_h, min_w), (max_h, max_w) = image_size_range
    out = Path(out_dir)
    (out / split).mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations, visible = [], [], 0
    for i in range(num_images):
        rng = np.random.default_rng([seed, split_index, i])
        height, width = int(rng.integers(min_h, max_h + 1)), int(rng.integers(min_w, max_w + 1))
        image, persons = synthetic_image(rng, height, width)
        image_id = split_index * IMAGE_ID_STRIDE + i + 1
        file_name = f"{image_id:012d}.jpg"  # COCO's naming
        ok, jpeg = cv2.imencode(
            ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
        )
        if not ok:
            raise RuntimeError(f"{out / split / file_name}: JPEG encoding failed")
        write_atomic(out / split / file_name, jpeg.tobytes())
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for k, (keypoints, (x0, y0, x1, y1)) in enumerate(persons):
            # x, y rounded to 1/100 pixel, v an integer, flat: x1, y1, v1, x2, ...
            coco_kp = [
                c for x, y, v in keypoints.tolist() for c in (round(x, 2), round(y, 2), int(v))
            ]
            num = int((keypoints[:, 2] > 0).sum())
            visible += int((keypoints[:, 2] == 2).sum())
            w, h = round(float(x1 - x0), 2), round(float(y1 - y0), 2)
            annotations.append(
                {
                    "id": image_id * 10 + k,  # MAX_PERSONS < 10: unique
                    "image_id": image_id,
                    "category_id": 1,
                    "keypoints": coco_kp,
                    "num_keypoints": num,
                    "bbox": [round(float(x0), 2), round(float(y0), 2), w, h],
                    "area": round(w * h * AREA_FRACTION, 2),
                    "iscrowd": 0,
                }
            )
    dataset = {
        "info": {"description": f"PSM-Pose synthetic people, seed {seed}", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [PERSON_CATEGORY],
    }
    # last, and whole or not at all: a split whose annotation file exists is complete (the demo
    # and a rerun after a kill rely on that)
    write_atomic(out / "annotations" / f"person_keypoints_{split}.json", json.dumps(dataset))
    return {"images": num_images, "persons": len(annotations), "visible_keypoints": visible}


def make_synthetic_coco(
    out_dir: str | os.PathLike,
    num_images: int,
    seed: int = 0,
    val_fraction: float = 0.2,
    image_size_range: tuple[tuple[int, int], tuple[int, int]] = IMAGE_SIZE_RANGE,
) -> dict[str, dict[str, int]]:
    """A COCO-style root with train2017 and val2017 (`val_fraction` of `num_images`, at least 1)."""
    if num_images < 2 or not 0 < val_fraction < 1:
        raise ValueError(f"num_images: need >= 2 (got {num_images}), val_fraction in (0, 1)")
    num_val = min(num_images - 1, max(1, round(num_images * val_fraction)))
    return {
        split: write_split(out_dir, split, n, seed, image_size_range)
        for split, n in zip(SPLITS, (num_images - num_val, num_val), strict=True)
    }


def make_synthetic(
    out_dir: str | os.PathLike, train_images: int, val_images: int, seed: int = 0
) -> dict[str, dict[str, int]]:
    """The CLI's entry (`psm make-data synthetic`): write both splits and print a summary."""
    counts = {
        split: write_split(out_dir, split, n, seed)
        for split, n in zip(SPLITS, (train_images, val_images), strict=True)
    }
    for split, c in counts.items():
        print(
            f"{Path(out_dir) / split}: {c['images']} images, {c['persons']} persons, "
            f"{c['visible_keypoints']} visible keypoints"
        )
    return counts


def demo_data_complete(cfg: Config) -> bool:
    """Each split's annotation file is written last and atomically: both present = complete data
    (a `psm make-data` killed between the splits leaves only the first)."""
    root = Path(cfg.data.root)
    return all((root / a).exists() for a in (cfg.data.train_annotations, cfg.data.val_annotations))


def ensure_demo_data(cfg: Config) -> None:
    """Write the demo's synthetic dataset where a config expects it and it is absent."""
    root = Path(cfg.data.root)
    if not demo_data_complete(cfg):
        print(f"== writing the synthetic COCO dataset to {root}")
        make_synthetic(root, train_images=400, val_images=40, seed=cfg.train.seed)


COCO_TRAIN_IMAGES = 118_287  # COCO 2017 train: the size `make_coco_size` repeats a sample up to


def make_coco_size(
    source_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    images: int = COCO_TRAIN_IMAGES,
    split: str = "train2017",
) -> dict[str, int]:
    """A COCO-size annotation file for load and memory tests: the source root's `split`
    annotations repeated (fresh image and annotation ids, the same file names) up to `images`
    images, in OUT/annotations; OUT's image folders link to the source's, so every entry is a
    real image. The other annotation files are linked as they are."""
    source, out = Path(source_root).resolve(), Path(out_dir)
    data = json.loads((source / "annotations" / f"person_keypoints_{split}.json").read_bytes())
    base_images, base_anns = data["images"], data["annotations"]
    by_image: dict[int, list[dict]] = {}
    for ann in base_anns:
        by_image.setdefault(ann["image_id"], []).append(ann)
    new_images, new_anns = [], []
    for k in range(images):
        entry = base_images[k % len(base_images)]
        image_id = k + 1
        new_images.append({**entry, "id": image_id})
        for ann in by_image.get(entry["id"], []):
            new_anns.append({**ann, "id": len(new_anns) + 1, "image_id": image_id})
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    repeated = {**data, "images": new_images, "annotations": new_anns}
    write_atomic(out / "annotations" / f"person_keypoints_{split}.json", json.dumps(repeated))
    written = source / "annotations" / f"person_keypoints_{split}.json"
    for path in [*source.iterdir(), *(source / "annotations").iterdir()]:
        link = out / path.relative_to(source)
        if path not in (source / "annotations", written) and not link.exists():
            link.symlink_to(path)
    return {"images": len(new_images), "annotations": len(new_anns)}
