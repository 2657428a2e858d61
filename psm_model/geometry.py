"""Person boxes to crops and back: the one geometry shared by training, evaluation and inference.

Conventions (as the official HRNet): boxes are COCO xywh in image pixels; a crop is given by its
centre (x, y) and scale (w, h) in units of PIXEL_STD = 200 pixels; crop sizes are (height, width);
pixel centres sit at integer coordinates (a mirror maps x to width - 1 - x). Matrices are 2x3
float64, image -> crop unless named otherwise. The training augmentation that draws these
matrices is `pipelines.augment`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from psm_model.coco_keypoints import COCO_FLIP_PAIRS

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
    box: np.ndarray | tuple[float, float, float, float], aspect: float, padding: float
) -> tuple[np.ndarray, np.ndarray]:
    """COCO xywh box -> (centre, scale): grown to `aspect` (= width / height), times `padding`
    (data.box_padding)."""
    centers, scales = boxes_to_centers_scales(np.asarray([box], np.float64), aspect, padding)
    return centers[0], scales[0]


def boxes_to_centers_scales(
    boxes: np.ndarray, aspect: float, padding: float
) -> tuple[np.ndarray, np.ndarray]:
    """`box_to_center_scale` of (N, 4) xywh boxes at once: (N, 2) float32 centres and scales."""
    x, y, w, h = np.asarray(boxes, np.float64).reshape(-1, 4).T
    centers = np.stack([x + 0.5 * w, y + 0.5 * h], axis=1).astype(np.float32)
    wider = w > aspect * h
    w, h = np.where(wider, w, h * aspect), np.where(wider, w / aspect, h)
    scales = np.stack([w, h], axis=1).astype(np.float32) / PIXEL_STD * padding
    return centers, scales


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


def flip_permutation(
    num_joints: int = 17, pairs: tuple[tuple[int, int], ...] = COCO_FLIP_PAIRS
) -> np.ndarray:
    """Index array `p` with `flipped[j] = original[p[j]]`: swaps each left/right pair."""
    perm = np.arange(num_joints)
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return perm


def flip_keypoints(keypoints: np.ndarray, image_width: int) -> np.ndarray:
    """Mirror keypoints (..., J, 2 or 3) in an image `image_width` wide (x' = width - 1 - x) and
    swap left/right joints; a third column (visibility) travels with its joint. Its own inverse."""
    kpts = np.asarray(keypoints)
    out = kpts[..., flip_permutation(kpts.shape[-2]), :].astype(
        kpts.dtype if np.issubdtype(kpts.dtype, np.floating) else np.float64
    )
    out[..., 0] = image_width - 1 - out[..., 0]
    return out
