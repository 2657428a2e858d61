"""data.root on an object store (moto's S3 server): annotations read through pyarrow, images read
inside the tasks that decode them, the same skips and messages as a local root."""

from pathlib import Path

import numpy as np
import pytest

from pipelines.coco import DataError, load_images, load_split
from pipelines.images import ImageError, decode_image
from pipelines.validate import load_gt_at
from psm_model.config_yaml import load_config
from tests.local_cluster import S3Server

REPO = Path(__file__).resolve().parents[1]
BUCKET = "coco-data"


@pytest.fixture(scope="module")
def s3_root(tmp_path_factory, synthetic_root):
    """The session's synthetic COCO root uploaded under s3://coco-data/coco."""
    server = S3Server(tmp_path_factory.mktemp("moto")).start(BUCKET)
    with server.in_environ():
        server.upload(synthetic_root, BUCKET, "coco")
        yield f"s3://{BUCKET}/coco"
    server.stop()


def _cfg(root):
    return load_config(str(REPO / "configs" / "tiny.yaml"), [f"data.root={root}"])


def test_a_split_on_s3_is_the_split_on_disk_with_uris_for_paths(s3_root, synthetic_root):
    local, local_skips = load_split(_cfg(synthetic_root), "train")
    remote, remote_skips = load_split(_cfg(s3_root), "train")
    assert remote_skips == local_skips and len(remote) == len(local) > 0
    for a, b in zip(local, remote, strict=True):
        assert b.path == f"{s3_root}/{Path(a.path).relative_to(synthetic_root)}"
        assert (a.image_id, a.width, a.height) == (b.image_id, b.width, b.height)
        assert [p.ann_id for p in a.persons] == [p.ann_id for p in b.persons]
    # the image a task decodes from the store is the image on disk
    np.testing.assert_array_equal(
        decode_image(remote[0].path, 10**7), decode_image(local[0].path, 10**7)
    )
    val = _cfg(s3_root)
    gt = load_gt_at(f"{s3_root}/{val.data.val_annotations}")
    images, _ = load_images(
        synthetic_root / val.data.val_images, synthetic_root / val.data.val_annotations
    )
    assert sorted(gt.getImgIds()) == [r.image_id for r in images]


def test_missing_objects_and_unreadable_buckets_fail_as_files_do(s3_root):
    with pytest.raises(ImageError, match=r"coco/nothing\.jpg: object not found") as error:
        decode_image(f"{s3_root}/nothing.jpg", 10**7)
    assert error.value.reason == "missing_image"
    with pytest.raises(DataError, match=r"s3://no-such-bucket/coco/annotations/\S+: cannot read"):
        load_split(_cfg("s3://no-such-bucket/coco"), "train")


def test_file_names_cannot_climb_out_of_the_image_prefix(s3_root, tmp_path):
    import json

    info = {
        "images": [
            {"id": 1, "file_name": "../secret.jpg", "width": 10, "height": 10},
            {"id": 2, "file_name": "/etc/passwd", "width": 10, "height": 10},
            {"id": 3, "file_name": "a/../../b.jpg", "width": 10, "height": 10},
            {"id": 4, "file_name": "ok/x.jpg", "width": 10, "height": 10},
        ],
        "annotations": [],
    }
    (tmp_path / "info.json").write_text(json.dumps(info))
    records, skips = load_images(f"{s3_root}/val", tmp_path / "info.json")
    assert [r.path for r in records] == [f"{s3_root}/val/ok/x.jpg"]
    assert skips["unsafe_file_name"] == 3


def test_detections_on_s3_read_as_a_local_file(s3_root, tmp_path):
    import json

    import boto3

    from pipelines.validate import read_detections_at
    from psm_model.coco_eval import EvalError

    dets = [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 30, 40], "score": 0.9}]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    boto3.client("s3").put_object(Bucket=BUCKET, Key="dets.json", Body=json.dumps(dets))
    sizes = {1: (100, 100)}
    local, _ = read_detections_at(str(tmp_path / "dets.json"), sizes, 0.0)
    remote, _ = read_detections_at(f"s3://{BUCKET}/dets.json", sizes, 0.0)
    np.testing.assert_array_equal(local.boxes, remote.boxes)
    with pytest.raises(EvalError, match=rf"s3://{BUCKET}/none.json: cannot read: not found"):
        read_detections_at(f"s3://{BUCKET}/none.json", sizes, 0.0)
