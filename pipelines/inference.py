"""Batch inference (`psm infer`): image rows with their detector boxes -> poses on the Ray Data
actors of `pose_predictions` -> COCO keypoint results, written in parts so that a killed job
resumes where it stopped.

The images are cut, in id order, into parts of infer.part_images. A part is final as soon as every
box of its images has come back from the actors (rescoring and OKS-NMS work per image and need
nothing from other images); it is then written atomically as `part-NNNNN.json` in the parts
folder beside the output. A rerun with the same inputs (the folder's manifest) sends only the
unfinished parts through Ray, and the results file is always the parts concatenated in order: a
resumed job writes exactly what an uninterrupted one writes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from pipelines.coco import DataError
from pipelines.datasets import pose_predictions
from psm_model.config import Config
from psm_model.evaluation import make_results
from psm_model.geometry import PIXEL_STD

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class PartStore:
    """The parts folder of one output: its manifest (what the results are of) and part files."""

    def __init__(self, folder: str | os.PathLike, manifest: dict) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / MANIFEST
        if path.exists():
            old = json.loads(path.read_text())
            keys = old.keys() | manifest.keys()
            changed = sorted(k for k in keys if old.get(k) != manifest.get(k))
            if changed:
                raise DataError(
                    f"{self.folder}: holds parts of a job with other inputs ({', '.join(changed)} "
                    "differ): delete the folder to start over, or choose another infer.output"
                )
        else:
            _write_json(path, manifest)

    def path(self, index: int) -> Path:
        return self.folder / f"part-{index:05d}.json"

    def done(self, count: int) -> list[int]:
        return [k for k in range(count) if self.path(k).exists()]

    def write(self, index: int, part: dict) -> None:
        _write_json(self.path(index), part)

    def read(self, index: int) -> dict:
        return json.loads(self.path(index).read_text())


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_name(path.name + ".tmp")  # a crash leaves the old file or none, never half
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def split_parts(rows: Sequence[dict], part_images: int) -> list[list[dict]]:
    """Image rows (in id order) cut into consecutive parts of `part_images` images."""
    return [list(rows[i : i + part_images]) for i in range(0, len(rows), part_images)]


class _Part:
    """One part while its poses come back: the boxes still due per image, the poses so far."""

    def __init__(self, rows: list[dict]) -> None:
        self.image_ids = [int(r["image_id"]) for r in rows]
        self.due = {int(r["image_id"]): len(r["ann_ids"]) for r in rows if len(r["ann_ids"])}
        self.poses: list[dict[str, np.ndarray]] = []
        self.skipped: Counter = Counter()

    def add(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> None:
        ok = rows[batch["skip"][rows] == ""]
        if len(ok):
            self.poses.append({k: v[ok] for k, v in batch.items() if k != "skip"})
        for i in rows:
            image_id = int(batch["image_id"][i])
            if batch["skip"][i]:  # an image that could not be decoded gives one skip row
                self.skipped[str(batch["skip"][i])] += 1
                self.due[image_id] = 0
            else:
                self.due[image_id] -= 1
            if not self.due[image_id]:
                del self.due[image_id]

    def finish(self, cfg: Config) -> dict:
        """The part file: its image ids, skips by reason and final results (rescored, OKS-NMS)."""
        results, persons = [], sum(len(p["image_id"]) for p in self.poses)
        if persons:
            cols = {k: np.concatenate([p[k] for p in self.poses]) for k in self.poses[0]}
            results = make_results(
                cols["image_id"], cols["coords"], cols["maxvals"], cols["score"],
                np.prod(cols["scale"] * PIXEL_STD, axis=1),  # the official NMS area: the crop box
                cfg.eval.keypoint_score_threshold, cfg.eval.oks_nms_threshold,
            )  # fmt: skip
        return {
            "image_ids": self.image_ids,
            "persons": persons,
            "skipped": dict(self.skipped),
            "results": results,
        }


def infer_parts(
    parts: Sequence[list[dict]],
    todo: Iterable[int],
    cfg: Config,
    weights: dict[str, torch.Tensor],
    store: PartStore,
) -> int:
    """Poses for the parts `todo` (indices into `parts`), each written to `store` once complete.

    One Ray Data graph over all their images (a single actor pool, model loaded once per actor);
    images without boxes never enter it. Returns the number of images sent to the actors.
    """
    open_parts: dict[int, _Part] = {}
    part_of: dict[int, int] = {}
    rows_with_boxes: list[dict] = []
    for k in todo:
        open_parts[k] = _Part(parts[k])
        for row in parts[k]:
            if len(row["ann_ids"]):
                part_of[int(row["image_id"])] = k
                rows_with_boxes.append(row)
    started, written = time.perf_counter(), 0

    def close(k: int) -> None:
        nonlocal written
        store.write(k, open_parts.pop(k).finish(cfg))
        written += len(parts[k])
        rate = written / max(time.perf_counter() - started, 1e-9)
        log.info("part %d written (%d images this run, %.1f images/s)", k, written, rate)

    for k in [k for k, p in open_parts.items() if not p.due]:  # nothing to pose
        close(k)
    if rows_with_boxes:
        # Ray call: one streaming graph; only pose rows come back to this driver
        batches = pose_predictions(rows_with_boxes, cfg, weights).iter_batches(
            batch_size=None, batch_format="numpy"
        )
        for batch in batches:
            owner = np.array([part_of[int(i)] for i in batch["image_id"]])
            for k in np.unique(owner):
                part = open_parts[int(k)]
                part.add(batch, np.flatnonzero(owner == k))
                if not part.due:
                    close(int(k))
    if open_parts:  # every box gives a row: a part left open means rows were lost
        raise RuntimeError(f"parts {sorted(open_parts)}: not all poses came back from Ray Data")
    return len(rows_with_boxes)
