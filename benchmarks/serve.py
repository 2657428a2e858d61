"""`psm bench serve`: the pose service (`psm serve`) under load on this machine, against
127.0.0.1 only, bounded in requests and time: per concurrency level, N requests -> p50 / p95 /
p99 latency, persons/s, errors, and each replica's memory before and after; against the pose
model alone on the same crops (`psm bench infer`'s pose-alone rate: one process, the pose
replica's threads). With `--kill`, the pose replica is SIGKILLed under load: every request must
end within serve.request_timeout_s as 200 or 503, and the replica come back.

The images are plain-background people (benchmarks.toy_detector, one person each), the detector
the tests' ONNX model, the pose model the config's with random weights (speed does not depend on
them), saved as a checkpoint folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import logging
import os
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from benchmarks.model import machine
from benchmarks.profile import describe
from jobs import command, storage
from psm_model.config import Config
from psm_model.recipe import EvalRecipe

log = logging.getLogger(__name__)

DETECTOR_SIZE = (160, 160)  # the tests' detector input


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(conn: http.client.HTTPConnection, path: str) -> int:
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    return response.status


def _post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", "/pose", body, {"Content-Type": "image/png"})
    response = conn.getresponse()
    return response.status, response.read()


def load(
    port: int, images: list[bytes], requests: int, concurrency: int, deadline_s: float
) -> dict:
    """`requests` POSTs of the images in turn from `concurrency` threads (a kept-alive
    connection each); stops sending at `deadline_s`. Latencies in ms, status counts."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    persons = 0
    lock, sent = threading.Lock(), iter(range(requests))
    stop = time.monotonic() + deadline_s

    def worker() -> None:
        nonlocal persons
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < stop:
            with lock:
                k = next(sent, None)
            if k is None:
                break
            t0 = time.perf_counter()
            try:
                status, body = _post(conn, images[k % len(images)])
            except (OSError, http.client.HTTPException):
                status, body = -1, b""
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            ms = (time.perf_counter() - t0) * 1e3
            found = len(json.loads(body)["persons"]) if status == 200 else 0
            with lock:
                latencies.append(ms)
                statuses[status] = statuses.get(status, 0) + 1
                persons += found
        conn.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    seconds = time.perf_counter() - started
    q = np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "seconds": seconds,
        "requests_s": len(latencies) / seconds,
        "persons_s": persons / seconds,
        "p50_ms": q[0],
        "p95_ms": q[1],
        "p99_ms": q[2],
        "max_ms": max(latencies, default=float("nan")),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": sum(v for k, v in statuses.items() if k != 200),
    }


def replicas() -> dict[str, list[int]]:
    """The live Serve replicas' process ids, by deployment (Ray's state API)."""
    from ray.util.state import list_actors

    out: dict[str, list[int]] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        if actor.class_name.startswith("ServeReplica:"):
            out.setdefault(actor.class_name.rsplit(":", 1)[-1], []).append(actor.pid)
    return out


def rss_mb(pids: dict[str, list[int]]) -> dict[str, float]:
    """Resident memory (MB) of each deployment's replicas, summed."""
    out = {}
    for name, ids in pids.items():
        total = 0
        for pid in ids:
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1])
        out[name] = round(total / 1024, 1)
    return out


def pose_alone(cfg: Config, model: torch.nn.Module, paths: list[str], detector: bytes) -> float:
    """Persons/s of the pose model alone on these images' crops in this process, with the pose
    replica's threads and forward passes (serve.pose_chunk crops; best of 3 passes): `psm bench
    infer`'s pose-alone rate at the replica's batch."""
    from pipelines.detect import detect_and_crop, detector_session
    from pipelines.predict import predict_poses

    session, layout = detector_session(detector, "toy-raw.onnx")
    columns = {"image_id": np.arange(len(paths)) + 1, "path": np.array(paths)}
    recipe = EvalRecipe.of(cfg)
    crops = detect_and_crop(columns, session, layout, recipe.crop, cfg.infer.detector)
    keep = crops["skip"] == ""
    size = cfg.serve.pose_chunk  # the pose replica's forward passes
    batches = [
        {k: v[keep][i : i + size] for k, v in crops.items()}
        for i in range(0, int(keep.sum()), size)
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.serve.pose.cpus)))
    try:
        predict_poses(model, batches[0], recipe, "cpu")  # warm-up
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for b in batches:
                predict_poses(model, b, recipe, "cpu")
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return int(keep.sum()) / best


def kill_under_load(port: int, images: list[bytes], cfg: Config, seconds: float) -> dict:
    """Concurrency 8 for `seconds`; a third of the way in, the pose replica is SIGKILLed. Every
    request must end (200 or 503, none past the timeout); the seconds until /healthz is 200 again
    and a request is answered."""
    victim = replicas()["PoseModel"][0]
    box: dict = {}

    def _post_first(conn: http.client.HTTPConnection) -> int:
        return _post(conn, images[0])[0]

    def killer() -> None:
        time.sleep(seconds / 3)
        os.kill(victim, signal.SIGKILL)
        box["killed_at"] = time.monotonic()

    thread = threading.Thread(target=killer)
    thread.start()
    result = load(port, images, 10**6, 8, seconds)
    thread.join()
    deadline, seen = time.monotonic() + 120, {}
    while time.monotonic() < deadline and len(seen) < 2:
        for what, call in (("healthz", lambda c: _get(c, "/healthz")), ("pose", _post_first)):
            if what in seen:
                continue
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                if call(conn) == 200:
                    seen[what] = time.monotonic() - box["killed_at"]
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
        time.sleep(0.2)
    back = replicas().get("PoseModel", [])
    return {
        **result,
        "killed_pid": victim,
        "healthy_after_s": seen.get("healthz", float("nan")),
        "posed_after_s": seen.get("pose", float("nan")),
        "replica_back": bool(back) and victim not in back,
        "timeout_s": cfg.serve.request_timeout_s,
    }


def bench_serve(
    cfg: Config,
    images: int,
    size_hw: tuple[int, int],
    requests: int,
    levels: list[int],
    deadline_s: float,
    kill_s: float,
    json_out: str | None,
) -> dict:
    import ray

    from benchmarks.toy_detector import export_toy_detector, write_plain_people
    from jobs.serve import APP_NAME, serve_app
    from psm_model.checkpoint import save_model
    from psm_model.hrnet import build_model

    record: dict = {
        "machine": machine(),
        "cpus": os.cpu_count(),
        "model": describe(cfg.model),
        "images": images,
        "image_size": list(size_hw),
        "date": time.strftime("%Y-%m-%d"),
        "serve": cfg.to_dict()["serve"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        write_plain_people(tmp, images + 1, seed=0, size_hw=size_hw)
        paths = sorted(str(p) for p in (Path(tmp) / "images").glob("*.png"))[:images]
        bodies = [Path(p).read_bytes() for p in paths]
        detector = export_toy_detector("raw", DETECTOR_SIZE)
        (Path(tmp) / "det.onnx").write_bytes(detector)
        det = dataclasses.replace(
            cfg.infer.detector,
            model=str(Path(tmp) / "det.onnx"),
            input_size=DETECTOR_SIZE,
            pad_value=20.0,
        )
        cfg = dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, detector=det))
        model = build_model(cfg.model).eval()
        save_model(Path(tmp) / "ckpt", model, cfg)
        record["pose_alone_before_persons_s"] = pose_alone(cfg, model, paths, detector)

        port = cfg.serve.port
        # the state API (replica pids) needs the dashboard: on a port of its own, named for
        # the state client (other Ray instances on the machine otherwise make it refuse)
        dashboard = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
        ray.init(dashboard_port=dashboard, log_to_driver=False)
        try:
            from ray import serve

            serve_app(cfg, str(Path(tmp) / "ckpt"), blocking=False)
            load(port, bodies, 2 * max(levels), max(levels), deadline_s)  # warm-up
            record["rss_mb_start"] = rss_mb(replicas())
            record["levels"] = []
            for c in levels:
                level = load(port, bodies, requests, c, deadline_s)
                pids = replicas()  # the live ones: Serve's autoscaler may have added some
                level["replicas"] = {name: len(ids) for name, ids in pids.items()}
                level["rss_mb_after"] = rss_mb(pids)
                record["levels"].append(level)
                log.info("concurrency %d: %s", c, level)
            if kill_s:
                record["kill"] = kill_under_load(port, bodies, cfg, kill_s)
            serve.delete(APP_NAME)
        finally:
            ray.shutdown()
        record["pose_alone_after_persons_s"] = pose_alone(cfg, model, paths, detector)
    record["pose_alone_persons_s"] = max(
        record["pose_alone_before_persons_s"], record["pose_alone_after_persons_s"]
    )
    for level in record["levels"]:
        level["over_pose_alone"] = level["persons_s"] / record["pose_alone_persons_s"]
    # the goal's figure: the last level at the top concurrency (after any scale-up)
    top = max(record["levels"][::-1], key=lambda r: r["concurrency"])
    record["top_over_pose_alone"] = top["over_pose_alone"]
    _print(record)
    if json_out:
        from pipelines.uris import write_bytes

        write_bytes(json_out, json.dumps(record, indent=1).encode())
    return record


def _print(r: dict) -> None:
    print(
        f"{r['machine']}, {r['cpus']} CPUs; {r['model']}; {r['images']} images "
        f"{r['image_size']}, one person each ({r['date']})"
    )
    print(
        "| concurrency | requests | p50 ms | p95 ms | p99 ms | persons/s | / pose alone | errors "
        "| replicas after | RSS MB after |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for x in r["levels"]:
        rss = ", ".join(f"{k} {v:.0f}" for k, v in x["rss_mb_after"].items())
        count = ", ".join(f"{k} {v}" for k, v in x["replicas"].items())
        print(
            f"| {x['concurrency']} | {x['requests']} | {x['p50_ms']:.1f} | {x['p95_ms']:.1f} | "
            f"{x['p99_ms']:.1f} | {x['persons_s']:.1f} | {x['over_pose_alone']:.2f} | "
            f"{x['errors']} | {count} | {rss} |"
        )
    start = ", ".join(f"{k} {v:.0f}" for k, v in r["rss_mb_start"].items())
    print(f"RSS MB after the warm-up: {start}")
    print(
        f"pose model alone: {r['pose_alone_persons_s']:.1f} persons/s (before "
        f"{r['pose_alone_before_persons_s']:.1f}, after {r['pose_alone_after_persons_s']:.1f}); "
        f"last level at the top concurrency / pose alone: {r['top_over_pose_alone']:.2f} "
        "(goal >= 0.8)"
    )
    if "kill" in r:
        k = r["kill"]
        print(
            f"pose replica killed under load (concurrency 8): {k['requests']} requests, "
            f"statuses {k['statuses']}, max {k['max_ms']:.0f} ms (timeout "
            f"{k['timeout_s']:g} s); after the kill: /healthz 200 at "
            f"{k['healthy_after_s']:.1f} s, a request answered at {k['posed_after_s']:.1f} s; "
            f"new replica: {k['replica_back']}"
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "The pose service (psm serve, detector + pose model) under load on 127.0.0.1: N "
        "requests per concurrency level -> latency percentiles, persons/s, errors, replica "
        "memory; against the pose model alone on the same crops (the pose replica's threads). "
        "--kill SECONDS: the pose replica SIGKILLed under load."
    )
    command.add_config_arguments(p)
    p.add_argument("--images", type=int, default=32, help="distinct images (one person each)")
    p.add_argument(
        "--size", type=command.size_hw, default=(480, 640), metavar="HxW", help="image size"
    )
    p.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument(
        "--deadline", type=float, default=120.0, help="seconds at most per level (then stops)"
    )
    p.add_argument("--kill", type=float, default=0.0, help="seconds of the replica-kill run")
    p.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.json:  # before the minutes of measuring
        storage.require_output_file(args.json, "--json")
    levels = [int(c) for c in args.concurrency.split(",")]
    bench_serve(
        command.load(args, f"serve.port={args.port or _free_port()}"),
        args.images,
        args.size,
        args.requests,
        levels,
        args.deadline,
        args.kill,
        args.json,
    )
