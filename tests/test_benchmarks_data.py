"""`psm bench data`: the in-process part on local files (the Ray graph is covered by the pipeline
tests), and the Ray Data part on an s3:// root (moto's S3 server)."""

import json
import re

import numpy as np

from benchmarks.data import bench_data, run_bench_data, sample_nbytes
from benchmarks.official_loader import official_nbytes
from pipelines.coco import NUM_JOINTS, load_coco_persons
from pipelines.synthetic import write_split
from psm_model.config_yaml import load_config
from tests.local_cluster import S3Server


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


def test_ray_part_reads_an_s3_root_with_one_head_and_one_get_per_image(
    ray_local, synthetic_root, tmp_path, capsys
):
    server = S3Server(tmp_path / "moto").start("coco-data")
    try:
        server.upload(synthetic_root, "coco-data", "coco")
        # endpoint and keys in the URI: the session's Ray workers started without the server's env
        root = (
            f"s3://psm-e2e:{server.secret}@coco-data/coco"
            f"?endpoint_override=127.0.0.1:{server.port}&scheme=http&region=us-east-1"
        )
        res = run_bench_data(
            load_config(None),
            root,
            0,
            workers=[1],
            sizes=[(64, 32)],
            json_out=str(tmp_path / "bench.json"),
            ray_min_samples=1,
        )
        absent = run_bench_data(load_config(None), root.replace("/coco?", "/none?"), 0, workers=[])
    finally:
        server.stop()
    (data,) = res["datasets"]
    assert data["dataset"].startswith("s3://***@coco-data/coco/train2017?")
    assert not data["in_process"]
    e = data["sizes"]["64x32"]
    assert "ours" not in e
    # the split as read from disk
    train = synthetic_root / "annotations" / "person_keypoints_train2017.json"
    records, skips = load_coco_persons(synthetic_root / "train2017", train, (64, 32))
    assert (e["images"], e["skipped"]) == (len(records), dict(skips))
    assert e["persons"] == sum(len(r.persons) for r in records)
    (ray,) = e["ray"]
    assert ray["workers"] == 1 and ray["images"] == e["images"] > 0
    assert ray["samples"] == e["persons"] and ray["samples_per_s"] > 0
    # the warm-up epoch and the timed one each read every image once: a HEAD (its size, checked
    # before the body) and a GET, as docs/operations.md prices them. The AWS SDK's own retry of
    # a GET is the same request twice in a row (seen once at a load average of 15: a second GET
    # 3 s after the HEAD, the same second as the first): one read
    log = (tmp_path / "moto" / "moto.log").read_text()
    requests = re.findall(r"(HEAD|GET) (/coco-data/coco/train2017/\S+\.jpg)", log)
    reads = [r for i, r in enumerate(requests) if i == 0 or r != requests[i - 1]]
    for method in ("HEAD", "GET"):
        assert sum(m == method for m, _ in reads) == 2 * e["images"], (method, requests)
    assert absent["datasets"] == []
    out = capsys.readouterr().out
    assert "in-process passes skipped" in out and "| 1 | " in out and "no COCO train split" in out
    assert server.secret not in out + (tmp_path / "bench.json").read_text()
