"""The jobs as users run them: `ray job submit --working-dir .` to a `ray start --head` cluster
with token authentication, logging over HTTP to an `mlflow server`, COCO (data.root),
checkpoints and results on S3 (moto's server), with the README's commands.

Slow (a few minutes on 2 cores): one cluster, one tracking server and one S3 server for the
module, stopped exactly at the end, also when a test fails; one training, which the eval and
infer jobs read.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import provenance
from tests.local_cluster import SHALLOW, MlflowServer, RayCluster, S3Server, wait_until

pytestmark = pytest.mark.slow

CONFIG = "configs/demo.yaml"
BUCKET = "psm-e2e"
EXPERIMENT = "psm-demo"  # the demo config's train.experiment


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    from pipelines.synthetic import make_synthetic

    work = tmp_path_factory.mktemp("ray_jobs")
    make_synthetic(work / "data", train_images=24, val_images=6, seed=3)
    mlflow_server = MlflowServer(work / "mlflow")
    s3 = S3Server(work / "s3")
    cluster = RayCluster(work / "cluster", cpus=2)
    try:
        mlflow_server.start()
        s3.start(BUCKET)
        s3.upload(work / "data", BUCKET, "coco")  # data.root=s3://...: read by the jobs' tasks
        cluster.extra_env = s3.env  # the nodes' credentials, as an instance profile gives them
        cluster.start()
        yield {"work": work, "cluster": cluster, "mlflow": mlflow_server, "s3": s3}
    finally:
        cluster.stop()
        s3.stop()
        mlflow_server.stop()


def _common(services) -> list[str]:
    """COCO on S3 (the fixture's synthetic root uploaded), as on a cluster without a shared
    file system: annotations read by the drivers, images by the Ray Data tasks."""
    return [f"data.root=s3://{BUCKET}/coco", f"train.mlflow_uri={services['mlflow'].uri}", SHALLOW]


def _client(services):
    import mlflow

    return mlflow.MlflowClient(services["mlflow"].uri)


def _runs(services, filter_string: str) -> list:
    client = _client(services)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:  # no job has logged a run yet
        return []
    return client.search_runs([experiment.experiment_id], filter_string=filter_string)


def _succeeded(result) -> None:
    assert result.returncode == 0 and "succeeded" in result.stdout + result.stderr, (
        result.stdout[-6000:] + result.stderr[-6000:]
    )


def _recorded_epoch(s3, prefix: str) -> int:
    """The newest epoch whose checkpoint is on S3 *and* recorded in Ray Train's run state (a
    folder uploaded but not yet recorded is not what a resume starts from); 0 before any."""
    client = s3.client()
    try:
        body = client.get_object(Bucket=BUCKET, Key=prefix + "checkpoint_manager_snapshot.json")
        recorded = json.loads(body["Body"].read())["checkpoint_results"]
    except (client.exceptions.NoSuchKey, ValueError, KeyError):  # not yet, or mid-write
        return 0
    epochs = [0]
    for result in recorded:
        key = f"{prefix}{result['checkpoint_dir_name']}/train_state.json"
        epochs.append(json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())["epoch"])
    return max(epochs)


@pytest.fixture(scope="module")
def trained(services):
    """`python -m jobs.train` as a Ray job, 4 epochs of the demo model on 2 gloo workers with
    its checkpoints on S3 (moto's server): the module's one training, whose checkpoints the eval
    and infer jobs read. Its tracking server is stopped once epoch 0's metrics are in (its port
    held), so epoch 1's are held; once epoch 1's checkpoint is recorded, the job is stopped, the
    server comes back (same port and store), and the same command resumes the run from S3 to its
    end. An epoch may end between the wait and the stop taking effect (a few seconds): the
    resume is checked against the epoch recorded once the job stopped, with one epoch or more
    still to train."""
    cluster, server, s3 = services["cluster"], services["mlflow"], services["s3"]
    prefix = "runs/e2e-train/"
    # the client's own retries (minutes by default) off: the run's held metrics do the retrying;
    # the checkout's commit, as `psm job-env` hands it over (the job's copy has no .git)
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    env |= provenance.job_env()["env_vars"]
    train = (
        "python",
        "-m",
        "jobs.train",
        CONFIG,
        *_common(services),
        "train.epochs=4",
        "train.name=e2e-train",
        f"train.storage_path=s3://{BUCKET}/runs",
    )
    options = ("--runtime-env-json", json.dumps({"env_vars": env}))
    first = cluster.job_id(cluster.submit(*train, options=options, wait=False))
    client = _client(services)

    def epoch_0_logged() -> bool:
        runs = _runs(services, "tags.`psm.run_name` = 'e2e-train'")
        return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "train_loss"))

    def epoch_1_held_and_recorded() -> bool:
        return "metric batches held" in cluster.logs(first) and _recorded_epoch(s3, prefix) >= 2

    # one budget for both waits: on a loaded machine the job's start and epoch 0 alone took
    # 4.5 min (beside a CPU hog and the demo), while the later epochs are short
    deadline = time.monotonic() + 480
    wait_until(
        epoch_0_logged, deadline - time.monotonic(), "epoch 0's metrics in MLflow", cluster, first
    )
    with server.outage():  # back on the same port and store, also when a wait fails
        wait_until(
            epoch_1_held_and_recorded,
            deadline - time.monotonic(),
            "epoch 1's held metrics and checkpoint",
            cluster,
            first,
        )
        cluster.ray("job", "stop", first, check=False)
        assert cluster.wait(first) in ("STOPPED", "FAILED")
    stopped_at = _recorded_epoch(s3, prefix)
    assert 2 <= stopped_at < 4, f"the stopped job recorded {stopped_at} of 4 epochs"
    resumed = cluster.submit(*train, options=options)
    _succeeded(resumed)
    return {"prefix": prefix, "jobs": [first, cluster.job_id(resumed)], "stopped_at": stopped_at}


def _newest_checkpoint(services, trained) -> str:
    prefix = trained["prefix"]
    states = [k for k in services["s3"].keys(BUCKET, prefix) if k.endswith("/train_state.json")]
    return f"s3://{BUCKET}/{sorted(states)[-1].rsplit('/', 1)[0]}"  # names sort by time


def test_a_client_without_the_token_is_refused(services, tmp_path):
    cluster = services["cluster"]
    home = tmp_path / "home"  # no ~/.ray/auth_token to fall back on
    home.mkdir()
    base = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    for env in (
        base | {"HOME": str(home)},
        base | {"HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)},
    ):
        refused = cluster.ray("job", "list", env=env, check=False, timeout=120)
        said = (refused.stdout + refused.stderr).splitlines()[-1]
        assert refused.returncode != 0 and "authenticat" in said.lower(), said
    assert cluster.ray("job", "list", check=False).returncode == 0  # with the token


@pytest.fixture(scope="module")
def refused(services) -> dict[str, tuple[str, float, str]]:
    """Three training jobs that must fail before any work, submitted together (each is a driver
    start and a config check: ~15 s alone): name -> (status, seconds from start to end, log)."""
    cluster, work = services["cluster"], services["work"]
    entrypoints = {
        "bad value": (CONFIG, "model.fusion=pms", *_common(services)),
        # the demo config's train.storage_path is `runs`: relative, so inside the uploaded copy
        "storage inside": (CONFIG, *_common(services)),
        # no tracking URI: the default sqlite file would be in the working dir too
        "tracking inside": (
            CONFIG,
            f"data.root={work / 'data'}",
            f"train.storage_path={work / 'runs'}",
        ),
    }
    jobs = {
        name: cluster.job_id(cluster.submit("python", "-m", "jobs.train", *args, wait=False))
        for name, args in entrypoints.items()
    }
    ended = {}
    for name, job_id in jobs.items():
        status = cluster.wait(job_id)
        job = cluster.job(job_id)
        seconds = (job["end_time"] - job["start_time"]) / 1000  # milliseconds since the epoch
        ended[name] = (status, seconds, cluster.logs(job_id))
    return ended


def test_a_bad_config_fails_fast_with_the_error_in_the_job_logs(refused):
    status, seconds, logs = refused["bad value"]
    assert status == "FAILED" and seconds < 120
    assert "model.fusion: 'pms' is not one of ('hrnet', 'psm')" in logs


def test_outputs_inside_the_jobs_temporary_working_dir_are_refused(refused):
    status, _, logs = refused["storage inside"]
    assert status == "FAILED"
    assert "train.storage_path: 'runs' is inside this job's working directory" in logs
    status, _, logs = refused["tracking inside"]
    assert status == "FAILED"
    assert "train.mlflow_uri (or $MLFLOW_TRACKING_URI)" in logs


def test_training_job_writes_checkpoints_and_its_mlflow_run(services, trained):
    keys = services["s3"].keys(BUCKET, trained["prefix"])
    assert any(k.endswith("/model.pt") for k in keys)
    assert _recorded_epoch(services["s3"], trained["prefix"]) == 4
    (run,) = _runs(services, "tags.`psm.run_name` = 'e2e-train'")
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "4"
    assert 0.0 <= run.data.metrics["val_AP"] <= 1.0
    versions = _client(services).search_model_versions(f"run_id = '{run.info.run_id}'")
    assert len(versions) == 1
    # the job ran a copy without .git: its code named by the commit handed over, and a digest
    # of the same source files as here
    assert run.data.tags["mlflow.source.type"] == "JOB"
    assert run.data.tags.get("mlflow.source.git.commit") == provenance.git_state().get("commit")
    assert run.data.tags["psm.source.digest"] == provenance.source_digest()
    assert {i.tags[0].value for i in run.inputs.dataset_inputs} == {"training", "validation"}


def test_training_survives_its_tracking_server_going_away_and_a_stop(services, trained):
    """Epoch 1's metrics were held while the server was away, in the checkpoint the stopped job
    left: the resumed job sent them, late but not never, and trained no recorded epoch again
    (a rerun would log its epoch twice)."""
    first, resumed = trained["jobs"]
    assert "metric batches held" in services["cluster"].logs(first)
    assert f"resumes at epoch {trained['stopped_at']}" in services["cluster"].logs(resumed)
    (run,) = _runs(services, "tags.`psm.run_name` = 'e2e-train'")
    history = _client(services).get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]


def test_eval_job_scores_the_checkpoint_like_training_validated_it(services, trained):
    checkpoint = _newest_checkpoint(services, trained)  # s3://...
    result = services["cluster"].submit(
        "python", "-m", "jobs.evaluate", CONFIG, "--checkpoint", checkpoint, *_common(services)
    )
    _succeeded(result)
    (train_run,) = _runs(services, "tags.`psm.run_name` = 'e2e-train'")
    (eval_run,) = _runs(services, f"params.`eval.checkpoint` = '{checkpoint}'")
    assert eval_run.info.status == "FINISHED"
    # the last epoch's validation ran the same weights through the same recipe
    assert eval_run.data.metrics["AP"] == pytest.approx(train_run.data.metrics["val_AP"], abs=1e-6)
    # submitted without `psm job-env`: no commit, the source digest names the code
    assert "mlflow.source.git.commit" not in eval_run.data.tags
    assert eval_run.data.tags["psm.source.digest"] == provenance.source_digest()


@pytest.fixture(scope="module")
def dets(services) -> Path:
    """The val set's ground-truth boxes as a detections file."""
    work = services["work"]
    annotations = json.loads((work / "data/annotations/person_keypoints_val2017.json").read_text())
    boxes = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0}
        for a in annotations["annotations"]
    ]
    (work / "dets.json").write_text(json.dumps(boxes))
    return work / "dets.json"


def test_infer_job_writes_its_results_and_parts_to_s3_and_resumes_them(services, trained, dets):
    """Outside the job's temporary working dir: the results file and its parts on S3; the same
    command again, with everything done, resumes every part and writes the same file."""
    cluster, s3, work = services["cluster"], services["s3"], services["work"]
    annotations = json.loads((work / "data/annotations/person_keypoints_val2017.json").read_text())
    checkpoint = _newest_checkpoint(services, trained)
    infer = (
        "python",
        "-m",
        "jobs.infer",
        CONFIG,
        "--checkpoint",
        checkpoint,
        "--dets",
        str(dets),
        "--output",
        f"s3://{BUCKET}/results/val.json",
        "infer.images=val2017",
        "infer.image_info=annotations/person_keypoints_val2017.json",
        "infer.part_images=2",
        *_common(services),
    )
    _succeeded(cluster.submit(*infer))
    body = s3.client().get_object(Bucket=BUCKET, Key="results/val.json")["Body"].read()
    results = json.loads(body)
    assert results and {r["image_id"] for r in results} <= {i["id"] for i in annotations["images"]}
    assert all(len(r["keypoints"]) == 51 and r["category_id"] == 1 for r in results)
    assert len([k for k in s3.keys(BUCKET, "results/val.json.parts/") if k.endswith(".json")])
    _succeeded(cluster.submit(*infer))
    assert s3.client().get_object(Bucket=BUCKET, Key="results/val.json")["Body"].read() == body
    (run,) = _runs(services, f"params.`infer.checkpoint` = '{checkpoint}'")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["poses"] == len(results)
    assert run.data.metrics["parts_resumed"] == 3  # 6 val images, 2 per part
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    digest = hashlib.sha256(dets.read_bytes()).hexdigest()
    assert set(inputs) == {"inference", "boxes"} and inputs["boxes"].digest == digest[:16]
    assert 0.0 <= run.data.metrics["AP"] <= 1.0  # an annotation file: the job scores it


def test_no_job_log_param_tag_or_saved_config_holds_the_s3_secret(services, trained):
    """The nodes' S3 secret (in their environment, as an instance profile gives it) appears in
    no job's logs, no MLflow param or tag, and no config saved with a run."""
    cluster, client = services["cluster"], _client(services)
    logged = [cluster.logs(job["submission_id"]) for job in cluster._api("/api/jobs/")]
    for r in _runs(services, ""):
        logged += [json.dumps(r.data.params), json.dumps(r.data.tags)]
        if any(a.path == "config.yaml" for a in client.list_artifacts(r.info.run_id)):
            logged.append(Path(client.download_artifacts(r.info.run_id, "config.yaml")).read_text())
    assert len(logged) > 4 and services["s3"].secret not in "\n".join(logged)


def _tune_statuses(experiment: Path) -> list[str]:
    """The trial statuses in Tune's newest saved experiment state (empty before the first save,
    or while one is being written)."""
    saved = sorted(experiment.glob("experiment_state-*.json"))
    try:
        trials = json.loads(saved[-1].read_text())["trial_data"] if saved else []
    except (OSError, ValueError):
        return []
    return [json.loads(state)["status"] for state, _ in trials]


def test_a_killed_sweep_job_resumes_without_rerunning_its_finished_trial(services):
    """`python -m jobs.tune` as a Ray job, its driver SIGKILLed once Tune's saved state has the
    first trial finished and the second running; the same job submitted again with --resume
    runs only what is left, and `psm compare` reads the sweep back."""
    cluster, work = services["cluster"], services["work"]
    space = work / "space.yaml"
    space.write_text(
        "searcher: grid\n"
        "max_concurrent_trials: 1\n"  # the first trial ends before the second starts
        "overrides:\n"
        "  train.epochs: 2\n"
        "  train.num_workers: 1\n"
        "  train.cpus_per_worker: 0.5\n"
        "  data.cpus_per_task: 0.4\n"
        "  eval.visualize: 0\n"
        "params:\n"
        "  data.sigma: {grid: [1.5, 2.5]}\n"
    )
    sweep = (
        "python",
        "-m",
        "jobs.tune",
        CONFIG,
        "--space",
        str(space),
        "--name",
        "e2e-sweep",
        f"train.storage_path={work / 'sweeps'}",
        *_common(services),
    )
    first = cluster.job_id(cluster.submit(*sweep, wait=False))

    def one_finished_one_running() -> bool:  # the job's log shows Tune's trial table
        statuses = _tune_statuses(work / "sweeps" / "e2e-sweep")
        return "TERMINATED" in statuses and "RUNNING" in statuses

    wait_until(one_finished_one_running, 420, "a finished and a running trial", cluster, first)
    driver = cluster.job(first)["driver_info"]
    os.kill(int(driver["pid"]), signal.SIGKILL)
    assert cluster.wait(first) == "FAILED"

    def trials() -> list:
        (parent,) = _runs(services, "tags.`psm.kind` = 'sweep'")
        return _runs(services, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")

    client = _client(services)
    (done,) = [t for t in trials() if t.info.status == "FINISHED"]
    before = client.get_metric_history(done.info.run_id, "train_loss")
    _succeeded(cluster.submit(*sweep, "--resume"))
    resumed = trials()
    assert len(resumed) == 2  # the interrupted trial resumed, none started twice
    assert sorted(t.data.params["data.sigma"] for t in resumed) == ["1.5", "2.5"]
    assert all(t.info.status == "FINISHED" for t in resumed)
    after = client.get_metric_history(done.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in after] == [(m.step, m.value) for m in before]  # not rerun
    for trial in resumed:
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "epochs_done")]
        assert sorted(set(steps)) == [0, 1]  # every trial completed both epochs

    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "psm"),
            "compare",
            EXPERIMENT,
            "--sweep",
            "e2e-sweep",
            "--tracking-uri",
            services["mlflow"].uri,
            "--csv",
            "-",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    rows = [line for line in out.splitlines()[1:] if line.strip()]
    assert len(rows) == 2
