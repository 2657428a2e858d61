"""Person boxes to crops and back: the one geometry shared by training, evaluation and inference.

Conventions (as the official HRNet): boxes are COCO xywh in image pixels; a crop is given by its
centre (x, y) and scale (w, h) in units of PIXEL_STD = 200 pixels; crop sizes are (height, width);
pixel centres sit at integer coordinates (a mirror maps x to width - 1 - x). Matrices are 2x3
float64, image -> crop unless named otherwise. Also here: the per-person training augmentation
(half body, scale, rotation, flip), all of it drawn from one numpy Generator per sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from psm_model.coco_keypoints import COCO_FLIP_PAIRS, UPPER_BODY_JOINTS
from psm_model.config import DataConfig

PIXEL_STD = 200.0
# A box narrower than a pixel holds no person, and at [10, 10, 1e-50, 1e-50] its float32 crop scale
# is 0 (ZeroDivisionError in affine_matrix); coordinates beyond 1e6 pixels are no image's.
MIN_BOX_SIDE = 1.0
MAX_BOX_COORD = 1e6


def box_problem(box: Sequence[float], image_size: tuple[int, int] | None = None) -> str:
    """Why a COCO xywh box of finite numbers cannot be cropped, or "" if it can; with the image's
    (width, height), the box must overlap the image."""
    x, y, w, h = (float(v) for v in box)
    if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(w) and math.isfinite(h)):
        return "not finite"
    if w < MIN_BOX_SIDE or h < MIN_BOX_SIDE:
        return f"a side under {MIN_BOX_SIDE} pixel"
    if max(abs(x), abs(y), w, h) > MAX_BOX_COORD:
        return f"beyond {MAX_BOX_COORD:g} pixels"
    if image_size is not None and (
        x >= image_size[0] or y >= image_size[1] or x + w <= 0 or y + h <= 0
    ):
        return "outside the image"
    return ""


def box_to_center_scale(
    box: np.ndarray | tuple[float, float, float, float], aspect: float, padding: float = 1.25
) -> tuple[np.ndarray, np.ndarray]:
    """COCO xywh box -> (centre, scale): grown to `aspect` (= width / height), times `padding`."""
    x, y, w, h = (float(v) for v in box)
    center = np.array([x + 0.5 * w, y + 0.5 * h], dtype=np.float32)
    if w > aspect * h:
        h = w / aspect
    else:
        w = h * aspect
    scale = np.array([w, h], dtype=np.float32) / PIXEL_STD * padding
    return center, scale


# ----------------------------------------------------------------------------------------------
# Affine maps between the image and a crop
# ----------------------------------------------------------------------------------------------


def affine_matrix(
    center: np.ndarray | tuple[float, float],
    scale: np.ndarray | tuple[float, float],
    rotation_deg: float,
    output_size_hw: tuple[int, int],
    inverse: bool = False,
) -> np.ndarray:
    """2x3 map image -> crop (or crop -> image with `inverse`), equal to the official HRNet
    `get_affine_transform(center, scale, rot, (w, h))` with shift 0.

    The box centre lands on (out_w / 2, out_h / 2) (not (w - 1) / 2: the official convention, which
    the decoders' maps back to the image must share), lengths scale by out_w / (scale[0] * 200)
    (the official code ignores scale[1]: the box is assumed already grown to the crop aspect), and
    a positive angle turns the image content counter-clockwise as displayed (y down).
    """
    cx, cy = float(center[0]), float(center[1])
    out_h, out_w = output_size_hw
    if not (float(scale[0]) > 0 and math.isfinite(float(scale[0]) + cx + cy)):
        # readers skip such boxes (box_problem); this names the value if one slips through
        raise ValueError(f"affine_matrix: crop centre {cx, cy} / scale {float(scale[0])} unusable")
    k = out_w / (float(scale[0]) * PIXEL_STD)
    theta = math.radians(rotation_deg)
    cs, sn = math.cos(theta), math.sin(theta)
    # Closed form of the official three-point construction: a similarity (no shear, no reflection)
    # x_crop = k * R(-theta) @ (x - c) + out_centre, with R(a) the usual y-up rotation matrix.
    # Plain floats: this runs once per training sample, where numpy's per-call cost dominated.
    if not inverse:
        a, b = k * cs, k * sn  # lin = [[a, b], [-b, a]], src = c, dst = out_centre
        sx, sy, dx, dy = cx, cy, out_w * 0.5, out_h * 0.5
        return np.array([[a, b, dx - (a * sx + b * sy)], [-b, a, dy - (-b * sx + a * sy)]])
    a, b = cs / k, sn / k  # lin = [[a, -b], [b, a]], src = out_centre, dst = c
    sx, sy, dx, dy = out_w * 0.5, out_h * 0.5, cx, cy
    return np.array([[a, -b, dx - (a * sx - b * sy)], [b, a, dy - (b * sx + a * sy)]])


def mirror_matrix(image_width: int) -> np.ndarray:
    """2x3 mirror of an image `image_width` pixels wide: x' = width - 1 - x (official)."""
    return np.array([[-1.0, 0.0, image_width - 1.0], [0.0, 1.0, 0.0]])


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """2x3 matrix of `outer(inner(x))`."""
    return outer[:, :2] @ inner + np.concatenate([np.zeros((2, 2)), outer[:, 2:]], axis=1)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to points (..., 2); the dtype follows `points` (float)."""
    pts = np.asarray(points)
    out = pts[..., :2] @ matrix[:, :2].T + matrix[:, 2]
    return out.astype(pts.dtype if np.issubdtype(pts.dtype, np.floating) else np.float64)


def warp_crop(
    image: np.ndarray,
    matrix: np.ndarray,
    output_size_hw: tuple[int, int],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """One warpAffine: bilinear, constant 0 outside the image (the official crop). `out` (uint8,
    (H, W, C), C-contiguous, e.g. one row of a batch array) receives the crop in place."""
    out_h, out_w = output_size_hw
    return cv2.warpAffine(
        image,
        matrix,
        (int(out_w), int(out_h)),
        dst=out,
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


# ----------------------------------------------------------------------------------------------
# Left/right flip of COCO keypoints
# ----------------------------------------------------------------------------------------------


def flip_permutation(
    num_joints: int = 17, pairs: tuple[tuple[int, int], ...] = COCO_FLIP_PAIRS
) -> np.ndarray:
    """Index array `p` with `flipped[j] = original[p[j]]`: swaps each left/right pair."""
    perm = np.arange(num_joints)
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return perm


_FLIP_PERM = flip_permutation()  # COCO's 17 joints: made once, used by every flipped sample


def flip_keypoints(keypoints: np.ndarray, image_width: int) -> np.ndarray:
    """Mirror keypoints (..., J, 2 or 3) in an image `image_width` wide and swap left/right joints.

    x' = width - 1 - x, the official pixel convention (pixel centres at integers); a third column
    (visibility) travels with its joint. Applying it twice gives the input back.
    """
    kpts = np.asarray(keypoints)
    out = kpts[..., flip_permutation(kpts.shape[-2]), :].astype(
        kpts.dtype if np.issubdtype(kpts.dtype, np.floating) else np.float64
    )
    out[..., 0] = image_width - 1 - out[..., 0]
    return out


# ----------------------------------------------------------------------------------------------
# Training augmentation
# ----------------------------------------------------------------------------------------------


def half_body_box(
    keypoints: np.ndarray, rng: np.random.Generator, aspect: float, padding: float = 1.5
) -> tuple[np.ndarray, np.ndarray] | None:
    """(centre, scale) of a box around the upper or the lower body, or None if too few joints.

    Official HRNet selection logic, but the choice is a fair coin (`rng.random() < 0.5`); the
    official `randn() < 0.5` picks the upper body ~69% of the time. As official: the chosen group
    is used if it has more than 2 visible joints, otherwise the lower body if it has more than 2,
    otherwise the upper body; fewer than 2 joints in the result gives None. The box centre is the
    mean of the joints (not the box middle); the box is grown to `aspect` (w / h) and x1.5.
    """
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


@dataclass(frozen=True)
class Augmentation:
    scale_factor: float  # multiplies the box scale: > 1 zooms out
    rotation_deg: float  # counter-clockwise, as `affine_matrix`
    flip: bool
    half_body: bool  # try a half-body box (applied only to persons with enough visible joints)


def draw_augmentation(rng: np.random.Generator, cfg: DataConfig) -> Augmentation:
    """One person's augmentation, drawn from `rng` only.

    HRNet draws clipped normals (scale 1 + 0.35 N(0,1) clipped to [0.65, 1.35]; rotation 45 N(0,1)
    clipped to +-90 deg); we draw uniformly in the paper's ranges instead: scale in
    [scale_min, scale_max], rotation in [-rotation, rotation] with probability rotation_prob.
    The caller seeds `rng` per sample (seed, epoch, image id, annotation id), so samples do not
    depend on the number of workers. Every draw is made unconditionally: the number of draws is
    fixed, whatever the config.
    """
    # one call for the five uniforms: the same values, in the same order, as five scalar draws
    # (rng.uniform(a, b) is a + (b - a) * rng.random()), for a fifth of the time
    u_half, u_scale, u_rotate, u_rotation, u_flip = rng.random(5).tolist()
    rotation = -cfg.rotation + 2 * cfg.rotation * u_rotation
    return Augmentation(
        scale_factor=cfg.scale_min + (cfg.scale_max - cfg.scale_min) * u_scale,
        rotation_deg=rotation if u_rotate < cfg.rotation_prob else 0.0,
        flip=u_flip < 0.5 and cfg.flip,
        half_body=u_half < cfg.half_body_prob,
    )


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
    visible (J,) uint8).

    Order as official: half body, scale, rotation, flip; then one warpAffine. The flip is the
    official "mirror the image, mirror the centre, crop" folded into the matrix (crop(mirror(x)))
    so the image is never copied. `augmentation` replaces the drawn one (tests, visualisation);
    the half-body choice still comes from `rng`. Joints that are invisible (v = 0) or land outside
    the crop get visible = 0 and coordinates (0, 0). `out` receives the crop (see `warp_crop`).
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
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < out_w) & (xy[:, 1] >= 0) & (xy[:, 1] < out_h)
    visible &= inside
    xy[~visible] = 0.0
    return crop, xy.astype(np.float32), visible.view(np.uint8)


def make_eval_crop(
    image: np.ndarray,
    center: np.ndarray,
    scale: np.ndarray,
    input_size_hw: tuple[int, int],
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Unaugmented crop and its image -> crop matrix (`inverse=True` in `affine_matrix` inverts);
    `out` receives the crop (see `warp_crop`)."""
    matrix = affine_matrix(center, scale, 0.0, input_size_hw)
    return warp_crop(image, matrix, input_size_hw, out), matrix
