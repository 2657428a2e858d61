"""Where `psm infer`'s person boxes come from: one object per job, chosen once from infer.boxes
by `box_source`. The three have the same members, in the order the job uses them:

- `check()` reads and checks what the source needs before any work; `rows(...)` the image rows;
  `params()` / `manifest()` / `inputs()` what names the boxes in MLflow params, in the parts'
  manifest (by digest, not location: resume compatibility) and as MLflow dataset inputs;
- `due(row)` the boxes an image is waited for (None: unknown until its first row comes back);
  `predictions(...)` the Ray Data graph that poses the rows; `part_boxes(...)` what a part file
  holds besides its poses;
- the accounting: `without_boxes(rows)` (images rightly without poses, for the submission check),
  `box_counts(...)`, `write_boxes(...)` (the boxes file), `box_metrics(...)` (box AP), and `label`
  and `summary_tail(...)` for the printed summary.

- `FileBoxes` (infer.boxes=file): a detector's boxes read from infer.detections.
- `AnnotationBoxes` (infer.boxes=gt): the persons of infer.image_info's annotations.
- `DetectorBoxes` (infer.boxes=detector): the ONNX detector of infer.detector, run as a stage of
  the same graph; an image's box count is known only once its first row comes back, and the
  boxes it found are written as a detections file (what infer.boxes=file reads).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ray
import torch
from pycocotools.coco import COCO

from pipelines.augment import image_rows
from pipelines.coco import DataError, ImageRecord, load_coco_persons
from pipelines.detect import detector_session, load_detector
from pipelines.predict import detected_pose_predictions, pose_predictions
from pipelines.uris import read_bytes, write_bytes
from pipelines.validate import detection_rows
from psm_model.coco_eval import coco_box_eval
from psm_model.config import Config, ConfigError
from psm_model.config_inference import DetectorConfig
from psm_model.errors import redact_secrets
from psm_model.recipe import CropSpec, EvalRecipe, PoseActors


@dataclass(frozen=True)
class Tally:
    """A finished job's part files, counted."""

    results: list[dict]  # the poses, COCO keypoint results format
    persons: int  # pose rows: one per box posed
    no_person: int  # images the detector found nobody in
    skipped: Counter  # images that could not be read, by reason
    boxes: list[dict]  # the detector's boxes, COCO results format (none with given boxes)

    @classmethod
    def of(cls, parts: Sequence[dict]) -> Tally:
        skipped: Counter = Counter()
        for part in parts:
            skipped.update(part["skipped"])
        return cls(
            results=[r for part in parts for r in part["results"]],
            persons=sum(part["persons"] for part in parts),
            no_person=sum(part.get("no_person", 0) for part in parts),
            skipped=skipped,
            boxes=[b for part in parts for b in part.get("boxes", [])],
        )


class _GivenBoxes:
    """Boxes known before the graph runs (a file, the annotations): each image row carries its
    own, and an image without any never enters the graph."""

    def check(self) -> None:
        """Nothing to read ahead: the boxes are read with the rows."""

    def due(self, row: dict) -> int:
        return len(row["ann_ids"])

    def predictions(
        self,
        rows: Sequence[dict],
        recipe: EvalRecipe,
        actors: PoseActors,
        weights: dict[str, torch.Tensor],
    ) -> ray.data.Dataset:
        return pose_predictions(rows, recipe, actors, weights)

    def part_boxes(self, poses: Sequence[dict[str, np.ndarray]], no_person: int) -> dict:
        return {}  # the boxes are the input's: a part file holds only its poses

    def without_boxes(self, rows: Sequence[dict]) -> dict[str, int]:
        """The submission check's count of images rightly without poses, besides skips."""
        return {"no_boxes": sum(len(r["ann_ids"]) == 0 for r in rows)}

    def box_counts(self, rows: Sequence[dict], tally: Tally) -> tuple[int, int]:
        """(images with boxes, boxes)."""
        return sum(len(r["ann_ids"]) > 0 for r in rows), sum(len(r["ann_ids"]) for r in rows)

    def write_boxes(self, tally: Tally) -> None:
        """Nothing to write: the boxes are the input's."""

    def box_metrics(self, gt: COCO, tally: Tally) -> dict[str, float]:
        return {}

    def summary_tail(self, tally: Tally) -> str:
        return ""


class FileBoxes(_GivenBoxes):
    """infer.boxes=file: a detector's boxes, COCO results format, at/above the score threshold."""

    def __init__(self, detections: str, score_threshold: float) -> None:
        if not detections:
            raise ConfigError(
                "infer.detections: required with infer.boxes=file: the person detector's boxes "
                "in COCO results format (e.g. the HRNet release's "
                "COCO_test-dev2017_detections_AP_H_609_person.json), or set infer.boxes=detector"
            )
        self.detections, self.score_threshold = detections, score_threshold
        self.label = detections
        self.sha256 = ""  # the file's, once `rows` has read it

    def rows(
        self, records: list[ImageRecord], images: str, info: str, crop: CropSpec
    ) -> list[dict]:
        rows = detection_rows(records, self.detections, self.score_threshold, crop)
        data = _read(self.detections, "infer.detections (--dets)")  # read again: its digest
        self.sha256 = hashlib.sha256(data).hexdigest()
        return rows

    def params(self) -> dict:
        """What the boxes are (MLflow params infer.box_source.*): the file and its sha256."""
        return {
            "boxes": "file",
            "detections": self.detections,
            "detections_sha256": self.sha256,
            "box_score_threshold": self.score_threshold,
        }

    def manifest(self) -> dict:  # by digest, not location: the same file elsewhere resumes
        return {k: v for k, v in self.params().items() if k != "detections"}

    def inputs(self) -> list[tuple[str, str]]:
        """(location, sha256) of the boxes, MLflow dataset inputs."""
        return [(self.detections, self.sha256)]


class AnnotationBoxes(_GivenBoxes):
    """infer.boxes=gt: the persons of infer.image_info's annotations (val checks)."""

    label = "the annotations"

    def __init__(self, image_info: str) -> None:
        self.image_info = image_info

    def rows(
        self, records: list[ImageRecord], images: str, info: str, crop: CropSpec
    ) -> list[dict]:
        persons, _ = load_coco_persons(images, info, crop.input_size, crop.box_padding, False)
        return image_rows(sorted(persons, key=lambda r: r.image_id))

    def params(self) -> dict:
        return {"boxes": "gt", "gt": self.image_info}

    def manifest(self) -> dict:
        return self.params()

    def inputs(self) -> list[tuple[str, str]]:
        return []  # the annotations are the image list's dataset input already


class DetectorBoxes:
    """infer.boxes=detector: the ONNX detector's boxes, found by its actors in the job's graph;
    every image enters, and gives rows ("no_person" ones included) that carry its box count."""

    def __init__(self, detector: DetectorConfig, settings: dict, boxes_file: str) -> None:
        self.detector = detector
        self.settings = settings  # infer.detector as the config's dict: params, manifest
        self.boxes_file = boxes_file
        self.label = detector.model
        self.model, self.sha256 = b"", ""  # the .onnx bytes and their digest, once checked

    def check(self) -> None:
        """The detector read and loaded before any work: a clear error first."""
        model, self.sha256 = load_detector(self.detector.model)
        detector_session(model, self.detector.model)  # DetectorError: unknown layout
        self.model = model

    def rows(
        self, records: list[ImageRecord], images: str, info: str, crop: CropSpec
    ) -> list[dict]:
        return [{"image_id": r.image_id, "path": r.path} for r in records]

    def params(self) -> dict:
        """The detector model, its sha256 and every threshold."""
        return {
            "boxes": "detector",
            "detector_sha256": self.sha256,
            **{f"detector.{k}": v for k, v in self.settings.items()},
        }

    def manifest(self) -> dict:  # by digest, not location: the same model elsewhere resumes
        return {k: v for k, v in self.params().items() if k != "detector.model"}

    def inputs(self) -> list[tuple[str, str]]:
        return [(self.detector.model, self.sha256)]

    def due(self, row: dict) -> int | None:
        return None  # unknown until the image's first row arrives (its `image_boxes`)

    def predictions(
        self,
        rows: Sequence[dict],
        recipe: EvalRecipe,
        actors: PoseActors,
        weights: dict[str, torch.Tensor],
    ) -> ray.data.Dataset:
        return detected_pose_predictions(rows, recipe, actors, weights, self.detector, self.model)

    def part_boxes(self, poses: Sequence[dict[str, np.ndarray]], no_person: int) -> dict:
        """Who had nobody, and the boxes the job used (COCO results format)."""
        return {"no_person": no_person, "boxes": detector_boxes(poses)}

    def without_boxes(self, rows: Sequence[dict]) -> dict[str, int]:
        return {}  # an image without boxes is a no_person one

    def box_counts(self, rows: Sequence[dict], tally: Tally) -> tuple[int, int]:
        skipped = sum(tally.skipped.values())
        return len(rows) - tally.no_person - skipped, tally.persons

    def write_boxes(self, tally: Tally) -> None:
        """The boxes the job used, for a later run (infer.boxes=file) or a tool."""
        write_bytes(self.boxes_file, json.dumps(tally.boxes).encode())

    def box_metrics(self, gt: COCO, tally: Tally) -> dict[str, float]:
        return coco_box_eval(gt, tally.boxes)

    def summary_tail(self, tally: Tally) -> str:
        return f", {tally.no_person} without a person; boxes in {self.boxes_file}"


BoxSource = FileBoxes | AnnotationBoxes | DetectorBoxes


def box_source(cfg: Config) -> BoxSource:
    """The source infer.boxes names: the one place that reads it (ConfigError: boxes=file
    without infer.detections)."""
    infer = cfg.infer
    if infer.boxes == "file":
        return FileBoxes(infer.detections, cfg.eval.box_score_threshold)
    if infer.boxes == "detector":
        boxes_file = infer.boxes_output or _beside(infer.output, "_person_boxes.json")
        return DetectorBoxes(infer.detector, cfg.to_dict()["infer"]["detector"], boxes_file)
    return AnnotationBoxes(infer.image_info)


def detector_boxes(poses: Sequence[dict[str, np.ndarray]]) -> list[dict]:
    """The detector's boxes behind pose rows, in COCO results format (what infer.boxes=file
    reads), in image id then score order."""
    out = []
    for batch in poses:
        for i in np.flatnonzero(batch["skip"] == ""):
            out.append(
                {
                    "image_id": int(batch["image_id"][i]),
                    "category_id": 1,
                    "bbox": [round(float(v), 2) for v in batch["box"][i]],
                    "score": round(float(batch["score"][i]), 5),
                }
            )
    return sorted(out, key=lambda b: (b["image_id"], -b["score"], b["bbox"]))


def _read(location: str, key: str) -> bytes:
    try:
        return read_bytes(location)
    except OSError as e:  # FileNotFoundError included
        raise DataError(
            f"{key}: {redact_secrets(location)}: cannot read: {redact_secrets(str(e))}"
        ) from e


def _beside(output: str, suffix: str) -> str:
    """OUTPUT's folder, its stem + suffix (a local path or a URI)."""
    stem, dot, ext = output.rpartition(".")
    return f"{stem if dot and '/' not in ext else output}{suffix}"
