"""`psm bench data`, in-process part only (the Ray graph is covered by the pipeline tests)."""

import json

import numpy as np

from benchmarks.data import bench_data, sample_nbytes
from benchmarks.official_loader import official_nbytes
from pipelines.coco import NUM_JOINTS
from pipelines.synthetic import write_split
from psm_model.config import load_config


def test_in_process_bench_on_synthetic_images(tmp_path, capsys):
    write_split(tmp_path, "train2017", 3, seed=0)
    out_json = tmp_path / "bench.json"
    res = bench_data(
        load_config(None),
        tmp_path / "train2017",
        tmp_path / "annotations" / "person_keypoints_train2017.json",
        workers=[],
        sizes=[(64, 48)],
        repeats=1,
        json_out=str(out_json),
    )
    e = res["sizes"]["64x48"]
    assert e["persons"] > 0 and "ray" not in e
    for path in ("ours", "limit", "official"):
        assert e[path]["crops"] == e["persons"]
        assert e[path]["crops_per_s"] > 0 and e[path]["decode_ms"] > 0 and e[path]["warp_ms"] > 0
    # uint8 crop, keypoints (17, 2) float32, visible (17,) uint8, image_id and ann_id int64,
    # center and scale (2,) float32, score float32, skip '' (0 bytes)
    small = NUM_JOINTS * 2 * 4 + NUM_JOINTS + 8 + 8 + 2 * 4 + 2 * 4 + 4 + 0
    assert e["ours"]["bytes_per_sample"] == 64 * 48 * 3 + small
    # official: float32 (3, 64, 48) image, float32 (17, 16, 12) heatmaps, (17, 1) weights
    assert e["official"]["bytes_per_sample"] == official_nbytes((64, 48))
    assert official_nbytes((64, 48)) == 3 * 64 * 48 * 4 + NUM_JOINTS * 16 * 12 * 4 + NUM_JOINTS * 4
    assert e["ours_vs_limit"] > 0 and e["ours_vs_official"] > 0
    assert json.loads(out_json.read_text())["sizes"]["64x48"]["persons"] == e["persons"]
    out = capsys.readouterr().out
    assert "| ours (train_batch) |" in out and "| official-HRNet-style |" in out


def test_sample_nbytes_counts_strings_by_length():
    row = {"image": np.zeros((2, 3, 3), np.uint8), "score": 1.0, "skip": "corrupt_image"}
    assert sample_nbytes(row) == 18 + 8 + len("corrupt_image")
