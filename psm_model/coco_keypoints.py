"""The COCO person keypoints: names, left/right pairs, OKS sigmas, skeleton, in COCO's joint order
(nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles; left before right)."""

from __future__ import annotations

import numpy as np

NUM_JOINTS = 17
PERSON_CATEGORY_ID = 1
KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
# (left, right) joint indices, swapped by a horizontal flip
COCO_FLIP_PAIRS: tuple[tuple[int, int], ...] = (
    (1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16),
)  # fmt: skip
UPPER_BODY_JOINTS: tuple[int, ...] = tuple(range(11))  # nose .. wrists; the rest is lower body
# per-joint OKS sigmas (pycocotools' kpt_oks_sigmas)
COCO_SIGMAS = np.array(
    [.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]
) / 10.0  # fmt: skip
# the person skeleton, 1-based as in the official annotation files
SKELETON = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
    [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]  # fmt: skip
