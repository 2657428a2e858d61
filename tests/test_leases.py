"""One live writer per output: the lease of pipelines/leases.py on a local disk (flock) and on S3
(moto's server: conditional PUT and DELETE), with real processes racing and dying."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines import leases
from pipelines.coco import DataError
from pipelines.inference import PartStore
from pipelines.leases import Lease, LeaseLost, check_held
from tests.local_cluster import S3Server

REPO = Path(__file__).resolve().parents[1]
BUCKET = "psm-leases"
TTL = 2.0  # seconds: short, so a dead S3 holder goes stale within the test


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto")).start(BUCKET)
    with server.in_environ():  # boto3 and pyarrow in this process, and in the holders
        yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out.parts")
    request.getfixturevalue("s3")
    return f"s3://{BUCKET}/{tmp_path.name}/out.parts"


def _job(folder: str, *, go: Path | None = None, delay: float = 0.0) -> subprocess.Popen:
    """Another job that takes the lease of `folder` (after `go` appears, with `delay` s injected
    before its create request), says whether it holds it, and holds it for a minute."""
    code = textwrap.dedent(f"""
        import pathlib, sys, time
        from pipelines import leases
        go = {str(go) if go else ""!r}
        print("ready", flush=True)
        while go and not pathlib.Path(go).exists():
            time.sleep(0.01)
        for store in (leases._LocalFile, leases._S3Object):
            create = store.create
            def late(self, data, create=create):
                time.sleep({delay})  # both takers have looked; neither has written yet
                return create(self, data)
            store.create = late
        try:
            lease = leases.Lease({folder!r}, "these parts", ttl_s={TTL})
        except leases.DataError as e:
            print("refused", e, flush=True)
            sys.exit(0)
        print("holds", flush=True)
        time.sleep(60)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    job = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
    assert job.stdout.readline().strip() == "ready"  # imported; waiting on `go`
    return job


def _stop(*jobs: subprocess.Popen) -> None:
    for job in jobs:
        job.send_signal(signal.SIGKILL)  # a real kill: no release
        job.wait()


def test_of_two_racing_jobs_exactly_one_holds_the_lease(folder, tmp_path):
    # before: the object-store lease was check-then-write; with 1 s between the two, both held
    go = tmp_path / "go"
    jobs = [_job(folder, go=go, delay=1.0) for _ in range(2)]
    try:
        go.touch()
        said = sorted(job.stdout.readline().split()[0] for job in jobs)
        assert said == ["holds", "refused"]
    finally:
        _stop(*jobs)


def test_a_dead_holders_lease_is_taken_and_a_live_ones_is_not(folder, caplog):
    holder = _job(folder)
    try:
        assert holder.stdout.readline().strip() == "holds"
        # alive (S3: renewing every TTL/4): refused, naming its pid
        with pytest.raises(DataError, match=rf"another job writes x .*pid {holder.pid}\)"):
            Lease(folder, "x", ttl_s=TTL)
    finally:
        _stop(holder)
    # dead: on a disk its lock went with it; on S3 its lease stops changing and is taken over
    with Lease(folder, "x", ttl_s=TTL) as lease:
        lease.check()
        assert folder.startswith("/") or "took over a lease not renewed" in caplog.text


def test_a_job_whose_lease_was_taken_writes_nothing_and_releases_only_its_own(folder):
    first = Lease(folder, "these parts", ttl_s=TTL)
    # another job takes it: on S3 as a taker of a stale lease does; on a disk, after a user
    # deleted LEASE while the first job still ran
    if folder.startswith("s3://"):
        first._stop.set()  # the first job hangs: no renewal
        first._renewer.join()
        second = Lease(folder, "these parts", ttl_s=TTL)
    else:
        os.unlink(f"{folder}/LEASE")
        second = Lease(folder, "these parts", ttl_s=TTL)
    with pytest.raises(LeaseLost, match=rf"now host \S+, pid {os.getpid()}\)"):
        first.check()
    with pytest.raises(LeaseLost):
        check_held(folder, first.token, "these parts")  # a training worker's check
    first.release()
    second.check()  # still the second job's
    check_held(folder, second.token, "these parts")
    second.release()


def test_a_lease_that_cannot_be_read_is_an_error_not_a_dead_holder(s3, tmp_path, monkeypatch):
    folder = f"s3://{BUCKET}/{tmp_path.name}/out.parts"
    key = f"{tmp_path.name}/out.parts/LEASE"
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=json.dumps({"token": "theirs"}))

    def unreachable(self):
        raise OSError("connection reset by peer")

    monkeypatch.setattr(leases._S3Object, "read", unreachable)
    monkeypatch.setattr(leases.time, "sleep", lambda s: None)
    with pytest.raises(DataError, match=r"out.parts/LEASE: cannot read the lease: connection"):
        Lease(folder, "these parts", ttl_s=TTL)
    body = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert json.loads(body) == {"token": "theirs"}  # not taken over


def test_the_parts_store_stops_writing_once_its_lease_is_taken(tmp_path):
    folder = tmp_path / "out.parts"
    store = PartStore(str(folder), {"weights_sha256": "a", "part_images": 4})
    store.write(0, {"results": []})
    os.unlink(folder / "LEASE")
    other = Lease(str(folder), "these parts")
    with pytest.raises(LeaseLost):
        store.write(1, {"results": []})
    assert not (folder / "part-00001.json").exists()
    store.release()
    other.release()


def test_a_second_training_of_the_same_name_is_refused_before_it_starts(tmp_path):
    from jobs import run_folder
    from jobs.tracking import Tracker
    from jobs.training import run_training
    from psm_model.config_yaml import load_config

    cfg = load_config(
        str(REPO / "configs" / "tiny.yaml"),
        [f"train.storage_path={tmp_path}", "train.name=r", f"data.root={tmp_path / 'none'}"],
    )
    with Lease(run_folder.location(cfg), "training run r"):
        with pytest.raises(DataError, match=r"another job writes training run r .*pid"):
            run_training(cfg, Tracker.of(cfg))
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["LEASE"]  # nothing else
