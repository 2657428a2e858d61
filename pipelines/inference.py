"""Batch inference (`psm infer`): image rows -> poses on the Ray Data actors of the job's box
source (`pipelines.box_sources`: the boxes of a file or the annotations, or the detector stage)
-> COCO keypoint results, written in parts so that a killed job resumes where it stopped.

The images are cut, in id order, into parts of infer.part_images. A part is final as soon as every
box of its images has come back from the actors (rescoring and OKS-NMS work per image and need
nothing from other images); it is then written atomically as `part-NNNNN.json` in the parts
folder beside the output (a local path or a pyarrow URI such as s3://). A rerun with the same
inputs (the folder's manifest) sends only the unfinished parts through Ray, and the results file
is always the parts concatenated in order: a resumed job writes exactly what an uninterrupted one
writes.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow.fs as pafs
import torch

from pipelines.box_sources import BoxSource
from pipelines.coco import DataError
from pipelines.eval_crops import NO_PERSON
from pipelines.leases import Lease
from pipelines.uris import filesystem, write_bytes
from pipelines.validate import pose_results
from psm_model.files import sha256
from psm_model.recipe import EvalRecipe, PoseActors, Rescoring

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PART_HASHES = "part_sha256"  # manifest key: part file name -> sha256 of its bytes


class PartStore:
    """The parts folder of one output (a local path or a URI): its lease (one job at a time), its
    manifest (what the results are of, and the sha256 of each finished part) and the part files.

    Take it as a context manager, or call `release()`; a job that dies without releasing frees
    the lease by dying (pipelines/leases.py), and its parts are resumed by the next job.
    """

    def __init__(self, folder: str, manifest: dict) -> None:
        self.folder = folder
        self.fs, self.root = filesystem(folder)
        self.fs.create_dir(self.root, recursive=True)
        self._lease = Lease(folder, "these parts")
        try:
            self._open_manifest(manifest)
        except BaseException:
            self.release()
            raise

    def _open_manifest(self, manifest: dict) -> None:
        # under the lease: no other job checks or writes the manifest between the two steps
        if MANIFEST in self._names():
            old = self._read(MANIFEST)
            self.hashes: dict[str, str] = old.pop(PART_HASHES, {})
            keys = old.keys() | manifest.keys()
            changed = sorted(k for k in keys if old.get(k) != manifest.get(k))
            if changed:
                raise DataError(
                    f"{self.folder}: holds parts of a job with other inputs ({', '.join(changed)} "
                    "differ): delete the folder to start over, or choose another infer.output"
                )
        else:
            self.hashes = {}
        self.manifest = manifest
        self._write_manifest()

    def _write_manifest(self) -> None:
        data = json.dumps({**self.manifest, PART_HASHES: self.hashes}, sort_keys=True).encode()
        write_bytes(self._uri(MANIFEST), data)

    def release(self) -> None:
        self._lease.release()

    def __enter__(self) -> PartStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _names(self) -> set[str]:  # one listing, not a request per part (object stores)
        infos = self.fs.get_file_info(pafs.FileSelector(self.root))
        return {i.base_name for i in infos if i.type == pafs.FileType.File}

    def _uri(self, name: str) -> str:
        return f"{self.folder.rstrip('/')}/{name}"

    def _bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(f"{self.root}/{name}") as f:
            return f.read()

    def _read(self, name: str) -> dict:
        try:
            return json.loads(self._bytes(name))
        except (ValueError, OSError) as e:  # JSONDecodeError is a ValueError
            raise DataError(f"{self._uri(name)}: unreadable or not JSON: {e}") from e

    @staticmethod
    def name(index: int) -> str:
        return f"part-{index:05d}.json"

    def done(self, count: int) -> list[int]:
        """The parts whose file is present and matches the sha256 the manifest recorded; any other
        part (missing, never recorded, truncated or changed) is logged and will be redone."""
        names, finished = self._names(), []
        for k in range(count):
            name = self.name(k)
            if name not in self.hashes:
                continue  # not finished: the manifest records a part after its file is on disk
            if name in names and sha256(self._bytes(name)) == self.hashes[name]:
                finished.append(k)
            else:
                log.warning(
                    "%s: corrupt or missing (sha256 differs from the manifest): redone",
                    self._uri(name),
                )
                del self.hashes[name]
        return finished

    def write(self, index: int, part: dict) -> None:
        self._lease.check()  # fencing: a job whose lease was taken over writes nothing more
        data = json.dumps(part).encode()
        write_bytes(self._uri(self.name(index)), data)
        self.hashes[self.name(index)] = sha256(data)
        self._write_manifest()

    def read(self, index: int) -> dict:
        return self._read(self.name(index))


def split_parts(rows: Sequence[dict], part_images: int) -> list[list[dict]]:
    """Image rows (in id order) cut into consecutive parts of `part_images` images."""
    return [list(rows[i : i + part_images]) for i in range(0, len(rows), part_images)]


class _Part:
    """One part while its poses come back: the boxes still due per image, the poses so far.

    An image's boxes due are its box source's (`due`): None with the detector stage, whose box
    counts are unknown until the image's first row arrives (its `image_boxes`); every image then
    gives rows, "no_person" ones included. An image with no box due is not waited for."""

    def __init__(self, rows: list[dict], source: BoxSource) -> None:
        self.image_ids = [int(r["image_id"]) for r in rows]
        self.source = source
        due = {int(r["image_id"]): source.due(r) for r in rows}
        self.due: dict[int, int | None] = {i: n for i, n in due.items() if n != 0}
        self.poses: list[dict[str, np.ndarray]] = []
        self.skipped: Counter = Counter()
        self.no_person = 0

    def add(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> None:
        self.poses.append({k: v[rows] for k, v in batch.items()})
        for i in rows:
            image_id = int(batch["image_id"][i])
            if batch["skip"][i] == NO_PERSON:  # the detector found nobody: done, counted
                self.no_person += 1
                self.due[image_id] = 0
            elif batch["skip"][i]:  # an image that could not be decoded gives one skip row
                self.skipped[str(batch["skip"][i])] += 1
                self.due[image_id] = 0
            else:
                if self.due[image_id] is None:
                    self.due[image_id] = int(batch["image_boxes"][i])
                self.due[image_id] -= 1
            if not self.due[image_id]:
                del self.due[image_id]

    def finish(self, rescoring: Rescoring) -> dict:
        """The part file: its image ids, skips by reason and final results (rescored, OKS-NMS),
        and what its box source adds (the detector's boxes)."""
        persons = sum(int((p["skip"] == "").sum()) for p in self.poses)
        results = pose_results(self.poses, rescoring)
        return {
            "image_ids": self.image_ids,
            "persons": persons,
            "skipped": dict(self.skipped),
            "results": results,
            **self.source.part_boxes(self.poses, self.no_person),
        }


def infer_parts(
    parts: Sequence[list[dict]],
    todo: Iterable[int],
    recipe: EvalRecipe,
    actors: PoseActors,
    weights: dict[str, torch.Tensor],
    store: PartStore,
    source: BoxSource,
) -> int:
    """Poses for the parts `todo` (indices into `parts`), each written to `store` once complete.

    One Ray Data graph over all their images (the box source's: a single actor pool, model
    loaded once per actor); images with no box due never enter it (with the detector stage,
    every image enters). Returns the number of images sent to the actors.
    """
    open_parts: dict[int, _Part] = {}
    part_of: dict[int, int] = {}
    rows_with_boxes: list[dict] = []
    for k in todo:
        open_parts[k] = _Part(parts[k], source)
        for row in parts[k]:
            if int(row["image_id"]) in open_parts[k].due:
                part_of[int(row["image_id"])] = k
                rows_with_boxes.append(row)
    started, written = time.perf_counter(), 0

    def close(k: int) -> None:
        nonlocal written
        store.write(k, open_parts.pop(k).finish(recipe.rescoring))
        written += len(parts[k])
        rate = written / max(time.perf_counter() - started, 1e-9)
        log.info("part %d written (%d images this run, %.1f images/s)", k, written, rate)

    for k in [k for k, p in open_parts.items() if not p.due]:  # nothing to pose
        close(k)
    if rows_with_boxes:
        # Ray call: one streaming graph; only pose rows come back to this driver
        poses = source.predictions(rows_with_boxes, recipe, actors, weights)
        batches = poses.iter_batches(batch_size=None, batch_format="numpy")
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
