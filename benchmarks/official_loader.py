"""The official-HRNet-style loader that `psm bench data` compares against (no Ray).

An emulation of the official `JointsDataset.__getitem__`, per person: cv2.imread of the file
again, the whole-image flip, `get_affine_transform`, warpAffine, the per-joint affine loop,
ToTensor + Normalize (float32 CHW) and `generate_target` (a Python loop pasting a 6 sigma + 1
Gaussian patch per joint into float32 heatmaps at stride 4). The augmentation draws are ours
(`draw_augmentation`), so both paths crop alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import cv2
import numpy as np

from pipelines.augment import draw_augmentation, half_body_box
from pipelines.coco import NUM_JOINTS, ImageRecord, PersonRecord
from psm_model.config import Config
from psm_model.geometry import flip_keypoints
from psm_model.hrnet import IMAGENET_MEAN, IMAGENET_STD

OFFICIAL_STRIDE = 4  # the official HRNet heatmaps: 96x72 at 384x288, 64x48 at 256x192
# CPU time of this thread, as the rest of the bench (benchmarks.data)
clock = time.thread_time


def official_sigma(input_size_hw: tuple[int, int]) -> float:
    """The official configs' sigma: 3 for 384x288 (96x72 heatmaps), 2 below."""
    return 3.0 if input_size_hw[0] >= 384 else 2.0


def official_nbytes(input_size_hw: tuple[int, int], num_joints: int = NUM_JOINTS) -> int:
    """Bytes of the official loader's tensors per sample: float32 input (3, H, W), float32 target
    (J, H/4, W/4) and target_weight (J, 1); the `meta` dict is not counted."""
    h, w = input_size_hw
    hh, hw = h // OFFICIAL_STRIDE, w // OFFICIAL_STRIDE
    return 3 * h * w * 4 + num_joints * hh * hw * 4 + num_joints * 4


def _official_affine(center, scale, rot_deg: float, size_hw: tuple[int, int]) -> np.ndarray:
    """The official `get_affine_transform` (shift 0): three points, cv2.getAffineTransform."""
    out_h, out_w = size_hw
    src_w = scale[0] * 200.0
    rot = np.pi * rot_deg / 180
    sn, cs = np.sin(rot), np.cos(rot)
    src_dir = np.array([src_w * 0.5 * sn, -src_w * 0.5 * cs])  # get_dir([0, -src_w / 2], rot)
    dst_dir = np.array([0, out_w * -0.5])
    src = np.zeros((3, 2), np.float32)
    dst = np.zeros((3, 2), np.float32)
    src[0] = center
    src[1] = center + src_dir
    dst[0] = [out_w * 0.5, out_h * 0.5]
    dst[1] = dst[0] + dst_dir
    for p in (src, dst):  # get_3rd_point
        d = p[0] - p[1]
        p[2] = p[1] + np.array([-d[1], d[0]], np.float32)
    return cv2.getAffineTransform(src, dst)


def official_target(
    joints: np.ndarray, vis: np.ndarray, size_hw: tuple[int, int], sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """The official `generate_target` (gaussian): per joint, a (6 sigma + 1)^2 patch pasted."""
    hh, hw = size_hw[0] // OFFICIAL_STRIDE, size_hw[1] // OFFICIAL_STRIDE
    num_joints = len(joints)
    target_weight = np.ones((num_joints, 1), dtype=np.float32)
    target_weight[:, 0] = vis
    target = np.zeros((num_joints, hh, hw), dtype=np.float32)
    tmp_size = sigma * 3
    for j in range(num_joints):
        mu_x = int(joints[j][0] / OFFICIAL_STRIDE + 0.5)
        mu_y = int(joints[j][1] / OFFICIAL_STRIDE + 0.5)
        ul = [int(mu_x - tmp_size), int(mu_y - tmp_size)]
        br = [int(mu_x + tmp_size + 1), int(mu_y + tmp_size + 1)]
        if ul[0] >= hw or ul[1] >= hh or br[0] < 0 or br[1] < 0:
            target_weight[j] = 0
            continue
        size = 2 * tmp_size + 1
        x = np.arange(0, size, 1, np.float32)
        y = x[:, np.newaxis]
        x0 = y0 = size // 2
        g = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))
        g_x = max(0, -ul[0]), min(br[0], hw) - ul[0]
        g_y = max(0, -ul[1]), min(br[1], hh) - ul[1]
        img_x = max(0, ul[0]), min(br[0], hw)
        img_y = max(0, ul[1]), min(br[1], hh)
        if target_weight[j] > 0.5:
            target[j][img_y[0] : img_y[1], img_x[0] : img_x[1]] = g[
                g_y[0] : g_y[1], g_x[0] : g_x[1]
            ]
    return target, target_weight


_MEAN = np.array(IMAGENET_MEAN, np.float32)
_STD = np.array(IMAGENET_STD, np.float32)


def official_geometry(
    person: PersonRecord,
    image_width: int,
    rng: np.random.Generator,
    cfg: Config,
    size_hw: tuple[int, int],
) -> tuple[np.ndarray, bool, np.ndarray, np.ndarray]:
    """The official `__getitem__`'s geometry for one person, with our draws from `rng`:
    (affine matrix (2, 3), flipped, joints (J, 2) in crop pixels, visibility (J,) float32).

    As official: half body, scale, rotation, then the flip of image, joints and centre (the
    caller mirrors the image); `fliplr_joints` zeroes unlabelled joints, which are never moved;
    no visibility is dropped for joints outside the crop.
    """
    out_h, out_w = size_hw
    joints = person.keypoints.astype(np.float64)
    vis = (joints[:, 2] > 0).astype(np.float32)
    c, s = person.center.astype(np.float64), person.scale.astype(np.float64)
    aug = draw_augmentation(rng, cfg.data)
    if aug.half_body and vis.sum() > cfg.data.half_body_min_joints:
        box = half_body_box(joints, rng, aspect=out_w / out_h)
        if box is not None:
            c, s = box[0].astype(np.float64), box[1].astype(np.float64)
    s = s * aug.scale_factor
    if aug.flip:  # official: data_numpy[:, ::-1, :], fliplr_joints, mirrored centre
        joints = flip_keypoints(joints, image_width)
        vis = (joints[:, 2] > 0).astype(np.float32)  # swapped with its joint
        joints[vis == 0, :2] = 0.0
        c = np.array([image_width - 1 - c[0], c[1]])
    trans = _official_affine(c, s, aug.rotation_deg, size_hw)
    for j in range(len(joints)):  # official affine_transform, one joint at a time
        if vis[j] > 0.0:
            joints[j, 0:2] = np.dot(trans, np.array([*joints[j, 0:2], 1.0]))
    return trans, aug.flip, joints[:, :2], vis


def time_official(records: Sequence[ImageRecord], cfg: Config, size: tuple[int, int]) -> dict:
    """One pass of the official loader's per-person work (module docstring), timed by stage."""
    sigma = official_sigma(size)
    out_h, out_w = size
    t = {"decode": 0.0, "warp": 0.0, "to_float": 0.0, "heatmaps": 0.0}
    crops = 0
    wall0, t_start = time.perf_counter(), clock()
    for rec in records:
        for p in rec.persons:
            rng = np.random.default_rng([cfg.train.seed, 0, rec.image_id, p.ann_id])
            t0 = clock()
            image = cv2.imread(rec.path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            t["decode"] += clock() - t0
            trans, flipped, joints, vis = official_geometry(p, image.shape[1], rng, cfg, size)
            if flipped:
                image = image[:, ::-1, :]
            t0 = clock()
            crop = cv2.warpAffine(image, trans, (out_w, out_h), flags=cv2.INTER_LINEAR)
            t["warp"] += clock() - t0
            t0 = clock()
            x = np.ascontiguousarray(crop.transpose(2, 0, 1)).astype(np.float32) / 255.0
            x = (x - _MEAN[:, None, None]) / _STD[:, None, None]  # ToTensor + Normalize
            t1 = clock()
            official_target(joints, vis, size, sigma)
            t["heatmaps"] += clock() - t1
            t["to_float"] += t1 - t0
            crops += 1
    sec = clock() - t_start
    return {"crops": crops, "seconds": sec, "wall_seconds": time.perf_counter() - wall0, **t}
