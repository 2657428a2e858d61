"""The Ray Serve deployments of `psm serve` (jobs/serve.py deploys them): `PoseService` (HTTP),
`Detector` and `PoseModel`, composed through deployment handles, and `application`, which binds
them with the replica options of the serve.* config. The steps of a request are the plain
functions of `pipelines/serving.py`; here are the Ray Serve calls and the HTTP answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from jobs.tracking import Tracker
from pipelines import serving
from pipelines.detect import fit
from psm_model.config import Config
from psm_model.config_inference import DetectorConfig, ReplicaConfig, ServeConfig
from psm_model.recipe import CropSpec, Rescoring

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("serve_page.html")


def page(threshold: float) -> str:
    """The page at `/`, with COCO's skeleton and the keypoint threshold filled in."""
    from psm_model.coco_keypoints import SKELETON

    text = PAGE.read_text().replace("__SKELETON__", json.dumps([list(p) for p in SKELETON]))
    return text.replace("__THRESHOLD__", json.dumps(threshold))


class WhenFree:
    """Requests that arrive while the model runs a batch wait here, and join the next batch
    together once it is free.

    Ray Serve's batcher does not wait for the model: while one batch runs it goes on cutting the
    queue into batches, each closed `batch_wait_s` after its first request, which then wait in
    turn. At concurrency 32 the pose model so ran batches of 1-5 crops at up to twice the cost
    of a crop in a batch of 32 (docs/benchmarks.md). Held here instead, the requests of one
    model run reach the batcher at once when it ends and are the next batch (up to
    max_batch_size), which starts at once: the batch wait is for a request that finds the model
    idle, to gather the ones just behind it.
    """

    def __init__(self, batched, replica: ReplicaConfig) -> None:
        self._free = asyncio.Event()
        self._free.set()
        self._waiting = 0
        self._batched, self._wait_s = batched, replica.batch_wait_s
        batched.set_max_batch_size(replica.max_batch_size)
        batched.set_batch_wait_timeout_s(replica.batch_wait_s)

    async def wait(self) -> None:
        self._waiting += 1
        try:
            await self._free.wait()
        finally:
            self._waiting -= 1

    @contextlib.asynccontextmanager
    async def running(self):
        self._free.clear()
        try:
            yield
        finally:  # Serve reads the wait when a batch's first request comes
            self._batched.set_batch_wait_timeout_s(0.0 if self._waiting else self._wait_s)
            self._free.set()


@serve.deployment
class Detector:
    """The person detector of infer.detector, batched: a batch of decoded images, each fitted to
    the detector's input by the HTTP replica (`pipelines.detect.fit`) and sent with its original
    height and width -> each one's person boxes (COCO x, y, w, h) in the original's pixels and
    scores, by `pipelines.detect.detect_people`, as `psm infer`'s detector actors find them."""

    def __init__(self, det: DetectorConfig, replica: ReplicaConfig) -> None:
        import cv2

        from pipelines.actors import keep_freed_memory
        from pipelines.detect import detector_session, load_detector

        keep_freed_memory()
        cv2.setNumThreads(1)  # as the infer job's detector actors
        data, _ = load_detector(det.model)
        threads = max(1, int(replica.cpus))
        self.session, self.layout = detector_session(data, det.model, threads)
        self.det = det
        self.free = WhenFree(self._batch, replica)  # and the batch bounds

    async def __call__(self, fitted: tuple[np.ndarray, tuple[int, int]]) -> tuple:
        await self.free.wait()
        return await self._batch(fitted)

    @serve.batch
    async def _batch(self, fitted: list[tuple[np.ndarray, tuple[int, int]]]) -> list[tuple]:
        from pipelines.detect import detect_people

        def detect() -> list[tuple[np.ndarray, np.ndarray]]:
            return [detect_people(self.session, self.layout, im, self.det, hw) for im, hw in fitted]

        # a thread: the replica's event loop goes on taking the next batch's requests
        async with self.free.running():
            return await asyncio.to_thread(detect)

    def ready(self) -> bool:
        return True


@serve.deployment
class PoseModel:
    """The checkpoint's pose model, batched: the crops of several requests run together, in
    chunks of serve.pose_chunk crops, by `pipelines.predict.predict_poses` (flip test, decode)."""

    def __init__(self, cfg: Config, checkpoint: str, tracker: Tracker) -> None:
        import torch

        from jobs.checkpoint_uri import load_model
        from pipelines.actors import keep_freed_memory
        from pipelines.predict import pose_model
        from psm_model.recipe import EvalRecipe

        keep_freed_memory()  # no page faults for each batch's activations
        torch.set_num_threads(max(1, int(cfg.serve.pose.cpus)))
        model, cfg = load_model(checkpoint, cfg, tracker)  # the checkpoint's model config wins
        self.recipe = EvalRecipe.of(cfg)  # once per replica, from the checkpoint's model config
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        runtime = cfg.infer.pose_runtime
        if runtime == "onnxruntime":
            from pipelines.predict import onnx_pose_model

            state = onnx_pose_model(self.recipe.model, state)
        # ONNX Runtime's threads: eval.cpus_per_worker, as a pose actor of `psm infer`
        cpus = cfg.eval.cpus_per_worker
        self.model, self.device = pose_model(self.recipe.model, state, runtime, cpus)
        self.chunk = cfg.serve.pose_chunk
        self.free = WhenFree(self._batch, cfg.serve.pose)  # and the batch bounds
        # the first forward pass is slow (allocations, kernels): not a request's
        h, w = self.recipe.model.input_size
        self._poses([_blank_crops(h, w)])

    def _poses(self, crops: list[dict]) -> list[dict]:
        from pipelines.predict import predict_poses

        batch, size = serving.stack_crops(crops), self.chunk
        n = len(batch["skip"])
        chunks = [
            predict_poses(
                self.model, {k: v[i : i + size] for k, v in batch.items()}, self.recipe, self.device
            )
            for i in range(0, n, size)
        ]
        poses = serving.stack_crops(chunks)
        return serving.split_poses(poses, [len(c["skip"]) for c in crops])

    async def __call__(self, crops: dict) -> dict:
        await self.free.wait()
        return await self._batch(crops)

    @serve.batch
    async def _batch(self, crops: list[dict]) -> list[dict]:
        async with self.free.running():
            return await asyncio.to_thread(self._poses, crops)

    def ready(self) -> bool:
        return True


def _blank_crops(h: int, w: int) -> dict[str, np.ndarray]:
    return {
        "image": np.zeros((1, h, w, 3), np.uint8),
        "image_id": np.zeros(1, np.int64),
        "ann_id": np.zeros(1, np.int64),
        "center": np.full((1, 2), 50, np.float32),
        "scale": np.ones((1, 2), np.float32),
        "score": np.ones(1, np.float32),
        "skip": np.array([""], dtype=object),
    }


# what a lost or restarting replica raises at its caller: worth one more try, then 503
def _unavailable() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ObjectLostError, RayActorError, WorkerCrashedError
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
    )

    return (
        RayActorError,
        WorkerCrashedError,
        ObjectLostError,
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
    )


class Unavailable(Exception):
    """A model deployment did not answer (replica lost twice, or the request's time ran out)."""


@serve.deployment
class PoseService:
    """HTTP: `POST /pose`, `GET /healthz`, `GET /` (the page). Never lets a request's input end
    the replica: a bad body is a 4xx JSON error (`pipelines.serving.RequestError`), a model
    replica that is lost mid-request is retried once, then 503; nothing waits past
    serve.request_timeout_s."""

    def __init__(
        self,
        detector,
        pose,
        settings: ServeConfig,
        crop: CropSpec,
        rescoring: Rescoring,
        model_info: dict,
        detector_size: tuple[int, int],
    ) -> None:
        self.detector, self.pose, self.info = detector, pose, model_info
        self.detector_size = detector_size  # infer.detector.input_size
        self.settings, self.crop, self.rescoring = settings, crop, rescoring
        self.page = page(rescoring.keypoint_score_threshold)

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/") or "/", request.method
        started = time.monotonic()
        try:
            if path == "/pose" and method == "POST":
                return JSONResponse(await self._pose(request, started))
            if path == "/healthz" and method == "GET":
                return await self._health()
            if path == "/" and method == "GET":
                return HTMLResponse(self.page)
            raise serving.RequestError(
                f"{method} {path}: not found (POST /pose, GET /healthz, GET /)", 404
            )
        except serving.RequestError as e:
            return _error(str(e), e.status)
        except Unavailable as e:
            return _error(str(e), 503, {"Retry-After": "1"})
        except Exception as e:  # a bug, not the input: logged, answered, the replica goes on
            log.exception("%s %s failed", method, path)
            return _error(f"internal error: {type(e).__name__}: {e}", 500)

    async def _pose(self, request: Request, started: float) -> dict:
        body = await _read_body(request, self.settings.max_body_bytes)
        asked = serving.parse_request(
            request.headers.get("content-type", ""), body, request.query_params.get("boxes")
        )
        image = await asyncio.to_thread(serving.decode, asked.image, self.crop.max_pixels)
        height, width = image.shape[:2]
        if asked.boxes is not None:
            boxes, scores = asked.boxes, asked.scores
            serving.check_boxes(boxes, scores, width, height, self.settings.max_boxes)
        elif self.detector is None:
            raise serving.RequestError(
                "no person detector in this service (infer.detector.model): give the boxes "
                "(multipart field or query parameter 'boxes')",
                422,
            )
        else:
            # the image fitted to the detector's input here: a tenth of the bytes to send
            fitted = await asyncio.to_thread(fit, image, self.detector_size)
            asked_for = (fitted, (height, width))
            boxes, scores = await self._call(self.detector, asked_for, "detector", started)
        crops = await asyncio.to_thread(serving.crop_persons, image, boxes, scores, self.crop)
        found = []
        if len(boxes):
            wanted = {k: crops[k] for k in ("image", "image_id", "ann_id", "center", "scale")}
            wanted.update(score=crops["score"], skip=crops["skip"])
            poses = await self._call(self.pose, wanted, "pose model", started)
            found = serving.persons(boxes, crops, poses, self.rescoring)
        return {"persons": found, "image": {"width": width, "height": height}, "model": self.info}

    async def _call(self, handle, payload, what: str, started: float):
        """The deployment's answer; a lost replica is tried once more (Serve routes the retry to
        a live one), then `Unavailable`; so is a call past the request's deadline."""
        for attempt in (1, 2):
            left = self.settings.request_timeout_s - (time.monotonic() - started)
            try:
                return await asyncio.wait_for(_result(handle.remote(payload)), max(left, 0.01))
            except asyncio.TimeoutError:
                raise Unavailable(
                    f"the {what} did not answer within serve.request_timeout_s="
                    f"{self.settings.request_timeout_s:g} s; try again"
                ) from None
            except _unavailable() as e:
                log.warning("%s call failed (attempt %d): %s", what, attempt, type(e).__name__)
        raise Unavailable(f"the {what} is unavailable (its replica was lost); try again")

    async def _health(self) -> Response:
        status, code = {"status": "ok", "model": self.info}, 200
        deps = [("pose model", self.pose), ("detector", self.detector)]
        for what, handle in deps:
            if handle is None:
                continue
            try:
                await asyncio.wait_for(_result(handle.ready.remote()), 5.0)
            except (asyncio.TimeoutError, *_unavailable()) as e:
                status = {"status": "unavailable", "error": f"{what}: {type(e).__name__}"}
                code = 503
        return JSONResponse(status, code)


async def _result(response):
    return await response


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) once it passes `limit` bytes, whether or not it said its size."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise serving.RequestError(
            f"body of {int(length):,} bytes; at most {limit:,} (serve.max_body_bytes)", 413
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise serving.RequestError(f"body over {limit:,} bytes (serve.max_body_bytes)", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _error(message: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status, headers)


def _replica_options(replica: ReplicaConfig, gpus: int = 0) -> dict:
    options = {
        "max_ongoing_requests": replica.max_ongoing,
        "ray_actor_options": {"num_cpus": replica.cpus, "num_gpus": gpus},
    }
    if replica.min_replicas == replica.max_replicas:
        options["num_replicas"] = replica.max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": replica.min_replicas,
            "max_replicas": replica.max_replicas,
            "target_ongoing_requests": replica.target_ongoing,
            "upscale_delay_s": replica.upscale_delay_s,
            "downscale_delay_s": replica.downscale_delay_s,
        }
    return options


def application(
    cfg: Config, checkpoint: str, model_info: dict, tracker: Tracker
) -> serve.Application:
    """The three deployments bound together (what `serve.run` and a Serve config file run);
    `tracker`, the job's, reaches a registered model (`models:/...`) from every pose replica."""
    import ray

    # Ray call: the pose model takes a GPU where the cluster has any, as the infer job's actors
    total = ray.cluster_resources()
    gpus = 1 if total.get("GPU", 0) > 0 else 0
    s, detecting = cfg.serve, bool(cfg.infer.detector.model)
    cpus = s.pose.min_replicas * s.pose.cpus + s.ingress_replicas * s.ingress_cpus
    cpus += s.detector.min_replicas * s.detector.cpus if detecting else 0
    if cpus > total.get("CPU", 0) or s.pose.min_replicas * gpus > total.get("GPU", 0):
        # Serve waits for replicas that cannot start (an autoscaler may add nodes): say so
        log.warning(
            "the service's replicas need %.2f CPUs (serve.*.min_replicas x cpus), the cluster "
            "has %.2f now: it waits for more",
            cpus,
            total.get("CPU", 0),
        )
    options = _replica_options(cfg.serve.pose, gpus)
    pose = PoseModel.options(**options).bind(cfg, checkpoint, tracker)
    detector = None
    if cfg.infer.detector.model:
        detector = Detector.options(**_replica_options(cfg.serve.detector)).bind(
            cfg.infer.detector, cfg.serve.detector
        )
    ingress = PoseService.options(
        num_replicas=cfg.serve.ingress_replicas,
        max_ongoing_requests=cfg.serve.ingress_max_ongoing,
        ray_actor_options={"num_cpus": cfg.serve.ingress_cpus},
    )
    # the ingress gets the few values it reads: no codec, so no torch in its process
    return ingress.bind(
        detector,
        pose,
        cfg.serve,
        CropSpec.of(cfg),
        Rescoring.of(cfg),
        model_info,
        cfg.infer.detector.input_size,
    )
