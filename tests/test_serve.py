"""`psm serve`: the request steps without Ray (bodies, boxes, the guarded decoder, the recipe),
the page's script on node, and one Serve application for the module on the session's Ray: the
persons `psm infer` writes for the same images, every bad input a 4xx JSON error with the
service going on, the page driven (node against the live service; Chromium where installed), the
MLflow run that traces the served model to its training run, and a pose replica killed under
requests."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pytest
import torch

from benchmarks.toy_detector import export_toy_detector, plain_image, write_plain_people
from pipelines import serving
from pipelines.detect import detect_people, detector_session
from pipelines.predict import predict_poses
from pipelines.validate import pose_results
from psm_model.coco_keypoints import SKELETON
from psm_model.config import ConfigError
from psm_model.config_yaml import load_config
from psm_model.hrnet import build_model
from psm_model.recipe import EvalRecipe

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
DETECTOR = ["infer.detector.input_size=[160,160]", "infer.detector.pad_value=20"]


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image[..., ::-1])[1].tobytes()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none (IHDR, then IEND)."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"
    return b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + ihdr + b"\x00" * 4 + b"IEND"


def _multipart(fields: dict[str, bytes]) -> tuple[str, bytes]:
    boundary = uuid.uuid4().hex
    body = b""
    for name, value in fields.items():
        filename = '; filename="x.png"' if name == "image" else ""
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n'
        body += head.encode() + b"\r\n" + value + b"\r\n"
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


def test_a_request_gives_its_image_and_boxes_or_a_4xx():
    png = _png(plain_image((48, 64), (10, 5, 30, 40)))
    assert serving.parse_request("image/png", png, None) == serving.PoseRequest(png)
    kind, body = _multipart({"image": png, "boxes": b"[[1, 2, 10, 20], [3, 4, 5, 6, 0.5]]"})
    asked = serving.parse_request(kind, body, None)
    assert asked.image == png
    np.testing.assert_array_equal(asked.boxes, [[1, 2, 10, 20], [3, 4, 5, 6]])
    np.testing.assert_array_equal(asked.scores, [1.0, 0.5])
    asked = serving.parse_request("image/png", png, "[[1, 2, 10, 20]]")  # the query parameter
    np.testing.assert_array_equal(asked.boxes, [[1, 2, 10, 20]])
    cases = [
        (*_multipart({"boxes": b"[]"}), "multipart body without an 'image' field", 400),
        ("image/png", b"", "empty body", 400),
        ("multipart/form-data", b"x", "boundary missing", 400),
        (*_multipart({"image": png, "boxes": b"[[1, 2"}), "boxes: not JSON", 422),
        (*_multipart({"image": png, "boxes": b"{}"}), "boxes: expected a list", 422),
        (*_multipart({"image": png, "boxes": b"[[1, 2, 3]]"}), r"boxes\[0\]: expected", 422),
        (*_multipart({"image": png, "boxes": b'[[1, 2, 3, "4"]]'}), r"boxes\[0\]", 422),
    ]
    for kind, body, message, status in cases:
        with pytest.raises(serving.RequestError, match=message) as e:
            serving.parse_request(kind, body, None)
        assert e.value.status == status


def test_boxes_outside_the_image_or_too_many_are_refused_naming_the_box():
    boxes, scores = np.array([[0, 0, 64, 48], [10, 10, 5, 5]], float), np.ones(2)
    serving.check_boxes(boxes, scores, 64, 48, 2)  # the whole image is a box
    cases = [
        (
            [[0, 0, 65, 48]],
            [1.0],
            r"boxes\[0\] \[0.0, 0.0, 65.0, 48.0\]: outside the image of 64x48",
        ),
        ([[-1, 0, 10, 10]], [1.0], "outside the image"),
        ([[5, 5, 0.5, 10]], [1.0], "a side under"),
        ([[5, 5, 10, 10]], [1.5], r"score 1.5 not in \[0, 1\]"),
        ([[5, 5, 10, 10]] * 3, [1.0] * 3, r"3 given, at most 2 \(serve.max_boxes\)"),
    ]
    for box, score, message in cases:
        with pytest.raises(serving.RequestError, match=message) as e:
            serving.check_boxes(np.array(box, float), np.array(score), 64, 48, 2)
        assert e.value.status == 422


def test_the_guarded_decoder_answers_bad_images_with_their_status():
    png = _png(plain_image((48, 64), (10, 5, 30, 40)))
    assert serving.decode(png, 10_000).shape == (48, 64, 3)
    cases = [
        (b"GIF89a not ours", "not a JPEG or PNG", 400),
        (png[: len(png) // 2], "truncated", 400),
        (_png_header(100_000, 100_000), "100000x100000 pixels; allowed: 1 to 10,000", 413),
        (_png_header(0, 48), "0x48 pixels: an empty image", 400),
        (_png_header(200, 100), "200x100 pixels", 413),
    ]
    for data, message, status in cases:
        with pytest.raises(serving.RequestError, match=message) as e:
            serving.decode(data, 10_000)
        assert e.value.status == status


def test_a_requests_persons_are_the_infer_recipe_on_its_crops():
    """Detector boxes -> crops -> poses -> `persons`: the poses `pose_results` (psm infer's
    rescoring and OKS-NMS) makes of the same rows, best first, with their boxes."""
    cfg = load_config(TINY, DETECTOR)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    session, layout = detector_session(export_toy_detector("raw", (160, 160)), "toy")
    image = plain_image((120, 160), (30, 10, 80, 110))
    boxes, scores = detect_people(session, layout, image, cfg.infer.detector)
    assert len(boxes) == 1
    boxes = np.concatenate([boxes, boxes + [2, 1, 0, 0]])  # a near copy for OKS-NMS
    scores = np.array([0.9, 0.6])
    recipe = EvalRecipe.of(cfg)
    crops = serving.crop_persons(image, boxes, scores, recipe.crop)
    poses = predict_poses(model, crops, recipe, "cpu")
    found = serving.persons(boxes, crops, poses, recipe.rescoring)
    expected = sorted(pose_results([poses], recipe.rescoring), key=lambda r: -r["score"])
    assert len(found) == len(expected) >= 1
    for person, result in zip(found, expected, strict=True):
        keypoints = np.array(person["keypoints"]).reshape(-1)
        np.testing.assert_allclose(keypoints, result["keypoints"], atol=1e-9)
        assert person["score"] == pytest.approx(result["score"])
    assert found[0]["box"] in [[round(float(v), 2) for v in b] for b in boxes]
    # several requests' crops through one batch come back to their requests
    again = serving.split_poses(serving.stack_crops([poses, poses]), [2, 2])
    np.testing.assert_array_equal(again[1]["coords"], poses["coords"])


def test_the_serve_section_is_checked():
    from jobs.deployments import _replica_options

    scaled = ["serve.pose.max_replicas=3", "serve.pose.min_replicas=0", "serve.pose.cpus=0.5"]
    cfg = load_config(TINY, [*scaled, "serve.pose.upscale_delay_s=5"])
    assert (cfg.serve.pose.min_replicas, cfg.serve.pose.max_replicas) == (0, 3)
    # what Serve is given: the autoscaler's bounds and delays, or a fixed count
    assert _replica_options(cfg.serve.pose, gpus=1) == {
        "max_ongoing_requests": 32,
        "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1},
        "autoscaling_config": {
            "min_replicas": 0,
            "max_replicas": 3,
            "target_ongoing_requests": 2.0,
            "upscale_delay_s": 5.0,
            "downscale_delay_s": 600.0,
        },
    }
    assert _replica_options(cfg.serve.detector)["num_replicas"] == 1
    for override, message in [
        ("serve.port=70000", r"serve.port: must be within \[1, 65535\]"),
        ("serve.pose.min_replicas=2", "serve.pose.min_replicas/max_replicas: need min <= max"),
        ("serve.detector.max_ongoing=4", "serve.detector.max_ongoing: 4 is below max_batch_size"),
        ("serve.max_body_bytes=0", "serve.max_body_bytes: must be positive"),
        ("serve.pose.batch_wait_s=-1", "serve.pose.batch_wait_s: must be >= 0"),
        ("serve.pose.upscale_delay_s=-1", "serve.pose.upscale_delay_s: must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(TINY, [override])


# the page's script run by node, the DOM and canvas replaced by recorders
NODE_DRIVER = r"""
const fs = require("fs"), vm = require("vm");
const [page, base, png] = process.argv.slice(1);  // node -e: no script path
const script = fs.readFileSync(page, "utf8").match(/<script>([\s\S]*)<\/script>/)[1];
const element = () => ({
  addEventListener() {}, classList: { add() {}, remove() {} }, dataset: {} });
const context = { document: { getElementById: element }, fetch, console };
vm.runInNewContext(script + "\nthis.api = { requestPoses, drawPoses, limbs };", context);
const calls = { strokeRect: [], stroke: 0, fill: 0 };
const ctx = { beginPath() {}, moveTo() {}, lineTo() {}, arc() {},
  stroke() { calls.stroke += 1; }, fill() { calls.fill += 1; },
  strokeRect(...box) { calls.strokeRect.push(box); } };
const send = (path, init) => fetch(base + path, init);
(async () => {
  const file = new Blob([fs.readFileSync(png)], { type: "image/png" });
  const result = await context.api.requestPoses(file, send);
  const drawn = context.api.drawPoses(ctx, result, 0.0);  // random weights: low confidences
  let error = "";
  try { await context.api.requestPoses(new Blob(["not an image"], { type: "image/png" }), send); }
  catch (e) { error = e.message; }
  console.log(JSON.stringify({ result, drawn, calls, error }));
})();
"""


def _node_page(page_file: Path, base: str, png: Path) -> dict:
    out = subprocess.run(
        ["node", "-e", NODE_DRIVER, str(page_file), base, str(png)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _limbs(person: dict, threshold: float) -> int:
    k = person["keypoints"]
    return sum(k[a - 1][2] > threshold and k[b - 1][2] > threshold for a, b in SKELETON)


# ----------------------------------------------------------------------------------------------
# One Serve application for the module
# ----------------------------------------------------------------------------------------------


def _request(port: int, method: str, path: str, body=None, headers=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        data = response.read()
        kind = response.getheader("content-type", "")
        return response.status, json.loads(data) if "json" in kind else data.decode()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    """psm infer with the detector stage on 3 plain-people images (one empty), then the same
    checkpoint folder and detector served (small body limit; CPUs that fit the 2-CPU Ray)."""
    from jobs.cli import main
    from jobs.serve import serve_app
    from jobs.tracking import Tracker
    from psm_model.checkpoint import save_model
    from tests.local_cluster import free_port

    tmp = tmp_path_factory.mktemp("serve")
    write_plain_people(tmp / "data", images=3, seed=4, size_hw=(120, 160))
    (tmp / "det.onnx").write_bytes(export_toy_detector("raw", (160, 160)))
    mlflow_uri = f"train.mlflow_uri=sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config(TINY, [mlflow_uri, "train.name=tiny-run"])
    torch.manual_seed(0)
    save_model(tmp / "ckpt", build_model(cfg.model), cfg)
    train_run = Tracker.of(cfg).start_or_resume_run("tiny-run", cfg, kind="train")  # its run

    detector = ["infer.boxes=detector", f"infer.detector.model={tmp / 'det.onnx'}", *DETECTOR]
    data = [f"data.root={tmp / 'data'}", "infer.images=images"]
    data += ["infer.image_info=annotations.json", "eval.visualize=0"]
    args = ["infer", TINY, mlflow_uri, *data, *detector, "--checkpoint", str(tmp / "ckpt")]
    assert main([*args, "--output", str(tmp / "infer.json")]) == 0

    port = free_port()
    overrides = [mlflow_uri, *detector, f"serve.port={port}", "serve.max_body_bytes=100000"]
    overrides += ["serve.pose.cpus=0.5", "serve.detector.cpus=0.25"]  # beside other tests' Ray
    serve_cfg = load_config(TINY, overrides)
    _, info = serve_app(serve_cfg, str(tmp / "ckpt"), blocking=False)
    yield {
        "port": port,
        "tmp": tmp,
        "info": info,
        "train_run": train_run,
        "infer": json.loads((tmp / "infer.json").read_text()),
        "boxes": json.loads((tmp / "infer_person_boxes.json").read_text()),
    }
    from ray import serve

    serve.shutdown()


def _image(service, k: int) -> bytes:
    return (service["tmp"] / "data" / "images" / f"{k:06d}.png").read_bytes()


@pytest.mark.slow
def test_the_service_answers_the_persons_psm_infer_writes(service):
    port = service["port"]
    for k in (1, 2, 3):  # image 3 is empty
        status, got = _request(
            port, "POST", "/pose", _image(service, k), {"Content-Type": "image/png"}
        )
        assert status == 200, got
        assert got["image"] == {"width": 160, "height": 120}
        assert got["model"]["weights_sha256"] == service["info"]["weights_sha256"]
        expected = sorted(
            (r for r in service["infer"] if r["image_id"] == k), key=lambda r: -r["score"]
        )
        assert len(got["persons"]) == len(expected) == (k != 3)
        for person, result in zip(got["persons"], expected, strict=True):
            np.testing.assert_allclose(
                np.array(person["keypoints"]).reshape(-1), result["keypoints"], atol=1e-3
            )
            assert person["score"] == pytest.approx(result["score"], abs=1e-3)
        boxes = [b["bbox"] for b in service["boxes"] if b["image_id"] == k]
        np.testing.assert_allclose([p["box"] for p in got["persons"]], boxes, atol=0.011)
    # the infer job's boxes given with the image (multipart): the detector skipped, same persons
    box = [b for b in service["boxes"] if b["image_id"] == 1][0]
    kind, body = _multipart(
        {"image": _image(service, 1), "boxes": json.dumps([box["bbox"]]).encode()}
    )
    status, given = _request(port, "POST", "/pose", body, {"Content-Type": kind})
    assert status == 200 and len(given["persons"]) == 1
    expected = [r for r in service["infer"] if r["image_id"] == 1][0]
    np.testing.assert_allclose(
        np.array(given["persons"][0]["keypoints"]).reshape(-1), expected["keypoints"], atol=1e-3
    )
    assert given["persons"][0]["box_score"] == 1.0  # a box given without a score
    status, health = _request(port, "GET", "/healthz")
    assert status == 200 and health["status"] == "ok"
    status, page = _request(port, "GET", "/")
    assert status == 200 and "PSM-Pose" in page and "__SKELETON__" not in page


@pytest.mark.slow
def test_the_load_benchmark_counts_what_the_service_answers(service):
    """`psm bench serve`'s request loop and replica census, on this service: 6 requests from 2
    clients cycle through the images (one person each on 1 and 2, none on 3)."""
    from benchmarks.serve import load, replicas, rss_mb

    images = [_image(service, k) for k in (1, 2, 3)]
    level = load(service["port"], images, requests=6, concurrency=2, deadline_s=120)
    assert level["statuses"] == {"200": 6} and level["requests"] == 6 and level["errors"] == 0
    assert level["persons_s"] * level["seconds"] == pytest.approx(4)
    assert level["p50_ms"] <= level["p99_ms"] <= level["max_ms"]
    live = replicas()
    assert {name: len(pids) for name, pids in live.items()} == {
        "PoseService": 1,
        "Detector": 1,
        "PoseModel": 1,
    }
    assert all(mb > 50 for mb in rss_mb(live).values())  # each a Python process with numpy


@pytest.mark.slow
def test_bad_input_is_a_clear_4xx_json_error_and_the_service_goes_on(service):
    port, png = service["port"], _image(service, 1)
    image = {"Content-Type": "image/png"}
    kind, outside = _multipart({"image": png, "boxes": b"[[100, 10, 80, 20]]"})
    cases = [
        ("POST", "/pose", b"not an image at all", image, 400, "not a JPEG or PNG"),
        ("POST", "/pose", png[: len(png) // 2], image, 400, "truncated"),
        ("POST", "/pose", _png_header(100_000, 100_000), image, 413, "100000x100000 pixels"),
        ("POST", "/pose", _png_header(0, 10), image, 400, "an empty image"),
        ("POST", "/pose", b"\xff" * 150_000, image, 413, "at most 100,000"),
        # no Content-Length (chunked): refused as it passes the limit
        ("POST", "/pose", iter([b"\xff" * 60_000] * 3), image, 413, "over 100,000 bytes"),
        ("POST", "/pose", outside, {"Content-Type": kind}, 422, "outside the image of 160x120"),
        ("POST", "/pose?boxes=[[1,2", png, image, 422, "boxes: not JSON"),
        ("GET", "/nothing", None, {}, 404, "not found"),
    ]
    for method, path, body, headers, status, message in cases:
        got_status, got = _request(port, method, path, body, headers)
        assert (got_status, got["status"]) == (status, status), got
        assert message in got["error"]
    status, got = _request(port, "POST", "/pose", png, image)  # the same replicas answer still
    assert status == 200 and len(got["persons"]) == 1


@pytest.mark.slow
def test_the_page_draws_the_skeletons_of_the_service(service, tmp_path):
    """The page's script on node, against the live service: it posts the image and draws each
    person's box and the limbs whose joints pass the threshold; an error shows the message."""
    from jobs.deployments import page

    if not shutil.which("node"):
        pytest.skip("node not installed")
    page_file = tmp_path / "page.html"
    page_file.write_text(page(0.2))
    png = service["tmp"] / "data" / "images" / "000001.png"
    out = _node_page(page_file, f"http://127.0.0.1:{service['port']}", png)
    (person,) = out["result"]["persons"]
    assert out["calls"]["strokeRect"] == [person["box"]]
    assert out["drawn"] == out["calls"]["stroke"] == _limbs(person, 0.0) > 0
    assert out["calls"]["fill"] == sum(v > 0.0 for _, _, v in person["keypoints"])
    assert "not a JPEG or PNG" in out["error"]
    if shutil.which("chromium"):  # where installed: the page itself, a file chosen in it
        from tests.browser import drive_page

        shot = tmp_path / "page.png"
        status = drive_page(f"http://127.0.0.1:{service['port']}/", png, shot)
        assert status.startswith("000001.png: 1 person(s)"), status
        assert shot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_the_deployment_is_an_mlflow_run_tracing_its_model(service):
    mlflow.set_tracking_uri(f"sqlite:///{service['tmp'] / 'mlflow.db'}")
    runs = mlflow.search_runs(
        experiment_names=["psm-pose"], filter_string="tags.`psm.kind` = 'serve'"
    )
    run = runs[runs["run_id"] == service["info"]["run_id"]].iloc[0]
    assert run["tags.psm.source_run"] == service["train_run"]  # the checkpoint's training run
    assert run["params.served.weights_sha256"] == service["info"]["weights_sha256"]
    assert run["params.served.checkpoint"] == str(service["tmp"] / "ckpt")
    assert run["params.serve.port"] == str(service["port"])
    assert run["params.serve.max_body_bytes"] == "100000"
    assert len(run["params.served.detector_sha256"]) == 64


@pytest.mark.slow
def test_a_pose_replica_killed_under_requests_gives_200_or_503_and_comes_back(service):
    from benchmarks.serve import replicas

    port, png = service["port"], _image(service, 1)
    (victim,) = replicas()["PoseModel"]
    statuses: list[int] = []

    def client() -> None:
        for _ in range(6):
            status, _ = _request(port, "POST", "/pose", png, {"Content-Type": "image/png"}, 40)
            statuses.append(status)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert len(statuses) == 24 and set(statuses) <= {200, 503}, statuses
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, got = _request(port, "POST", "/pose", png, {"Content-Type": "image/png"})
        if status == 200:
            break
        time.sleep(0.5)
    assert status == 200 and len(got["persons"]) == 1
    assert victim not in replicas()["PoseModel"]
