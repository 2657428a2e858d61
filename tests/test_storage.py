"""Outputs of a submitted job must outlive its temporary working directory; metrics that MLflow
cannot take now are held and sent later, once."""

import json
from pathlib import Path

import pytest

from jobs import storage, tracking
from jobs.tracking import Tracker
from psm_model.config import Config, ConfigError, TrainConfig
from tests.local_cluster import free_port

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


@pytest.fixture
def in_a_ray_job(monkeypatch, tmp_path):
    """What the job supervisor gives an entrypoint: its config variable, a copied working dir."""
    meta = {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_abc"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(meta))
    workdir = tmp_path / "working_dir_files" / "_ray_pkg_1"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    return workdir


def test_a_plain_process_is_not_a_submitted_job(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert storage.submitted_job() == ""
    storage.require_persistent("runs", "train.storage_path")  # local runs keep relative paths


def test_a_submitted_job_refuses_outputs_in_its_working_dir(in_a_ray_job):
    assert storage.submitted_job() == "raysubmit_abc"
    for location in (
        "runs",
        "./results/x.json",
        str(in_a_ray_job / "runs"),
        "sqlite:///mlflow.db",
        f"sqlite:///{in_a_ray_job}/mlflow.db",
        f"file://{in_a_ray_job}/out",
    ):
        with pytest.raises(ConfigError, match="inside this job's working directory"):
            storage.require_persistent(location, "train.storage_path")
    for location in (
        "/shared/runs",
        "s3://bucket/runs",
        "http://127.0.0.1:5000",
        "sqlite:////var/lib/mlflow/mlflow.db",
    ):
        storage.require_persistent(location, "train.storage_path")


def test_a_submitted_job_without_a_tracking_uri_is_refused(in_a_ray_job, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=r"train.mlflow_uri \(or \$MLFLOW_TRACKING_URI\)"):
        storage.require_persistent_tracking(Tracker.of(Config()).uri)


def test_metrics_are_held_while_the_server_is_away_and_stored_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    away = Tracker.of(Config(train=TrainConfig(mlflow_uri=f"http://127.0.0.1:{free_port()}")))
    held = [tracking.held_metrics({"loss": 0.5}, 0), tracking.held_metrics({"loss": 0.4}, 1)]
    assert away.deliver("run", held) == held  # nothing listens there

    cfg = Config(train=TrainConfig(mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    here = Tracker.of(cfg)
    run_id = here.start_or_resume_run("held", cfg)
    assert here.deliver(run_id, held) == []
    assert here.deliver(run_id, held) == []  # a restart sends its checkpoint's again
    import mlflow

    points = mlflow.MlflowClient(here.uri).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in points) == [(0, 0.5), (1, 0.4)]


def test_credentials_are_masked_in_what_is_logged(monkeypatch, tmp_path):
    from psm_model.errors import redact_secrets

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-K7MDENG")
    text = (
        "mlflow_uri: http://psm:hunter2@mlflow:5000\n"
        "storage_path: s3://bucket/runs?access_key=AKIA123&secret_key=s3cr3t&region=us-east-1\n"
        "note: wJalrXUtnFEMI-K7MDENG\n"
    )
    masked = redact_secrets(text)
    for secret in ("hunter2", "psm:", "s3cr3t", "AKIA123", "wJalrXUtnFEMI-K7MDENG"):
        assert secret not in masked
    assert "http://***@mlflow:5000" in masked and "region=us-east-1" in masked

    # what a training logs to MLflow: params and config.yaml
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = Config(train=TrainConfig(mlflow_uri=uri, storage_path="s3://u:hunter2@bucket/runs"))
    tracker = Tracker.of(cfg)
    run_id = tracker.start_or_resume_run("masked", cfg)
    run = tracker.get_run(run_id)
    assert run.data.params["train.storage_path"] == "s3://***@bucket/runs"
    saved = tracker.download_artifacts(run_id, "config.yaml", tmp_path).read_text()
    assert "hunter2" not in saved and "s3://***@bucket/runs" in saved


def test_a_secret_in_a_flag_reaches_no_param_tag_or_error_line(tmp_path, capsys):
    """Whatever key carries the URI: a job's own params (eval.checkpoint, the infer box source)
    and tags go through the same mask as the config; so does the one-line error."""
    from jobs.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    planted = "s3://AKIAPLANTED:PLANTEDSECRET@bucket/ck"
    cfg = Config(train=TrainConfig(mlflow_uri=uri))
    tracker = Tracker.of(cfg)
    run_id = tracker.start_or_resume_run("flags", cfg, tags={"psm.source": planted})
    tracker.log_params(run_id, {"eval.checkpoint": planted, "infer.detector": planted})
    tracker.set_tags(run_id, {"psm.detector": planted})
    run = tracker.get_run(run_id)
    assert run.data.params["eval.checkpoint"] == "s3://***@bucket/ck"
    assert run.data.tags["psm.detector"] == run.data.tags["psm.source"] == "s3://***@bucket/ck"

    # a checkpoint URI that cannot be read: one masked line at exit 2, not a traceback
    checkpoint = "file://AKIAPLANTED:PLANTEDSECRET@/nowhere/ck"
    capsys.readouterr()
    assert main(["eval", TINY, "--checkpoint", checkpoint, f"train.mlflow_uri={uri}"]) == 2
    said = capsys.readouterr()
    assert said.err.startswith("psm: error: file://***@/nowhere/ck: cannot read")
    assert "Traceback" not in said.err
    stored = (tmp_path / "mlflow.db").read_bytes()  # the whole store, not only what the API shows
    for secret in ("AKIAPLANTED", "PLANTEDSECRET"):
        assert secret not in said.out + said.err and secret.encode() not in stored


def test_a_sqlite_store_keeps_its_artifacts_beside_the_database(tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # MLflow's default would be ./mlruns here
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    cfg = Config(train=TrainConfig(mlflow_uri=f"sqlite:///{db}"))
    tracker = Tracker.of(cfg)
    run_id = tracker.start_or_resume_run("beside", cfg)
    assert tracker.start_or_resume_run("beside", cfg) == run_id  # the experiment is found again
    assert (db.parent / "mlartifacts" / run_id / "artifacts" / "config.yaml").is_file()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize(
    ("command", "key"),
    [
        (["export", "onnx", TINY, "--checkpoint", "/none.pt", "--output"], "--output"),
        (["infer", TINY, "--checkpoint", "/none.pt", "--dets", "/none.json", "--output"], "infer"),
        (["eval", TINY, "--checkpoint", "/none.pt", "--results"], "--results"),
        (["compare", "psm-pose", "--csv"], "--csv"),
        *(
            (["bench", kind, TINY, "--json"], "--json")
            for kind in ("model", "train", "data", "infer", "load")
        ),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    tmp_path, capsys, command, key
):
    """A folder where the file should go, a file where a folder should be (before: a traceback
    after all the work, or at its end): one line at exit 2 naming the key, before anything is
    read (the checkpoint and detections named here do not exist)."""
    from jobs.cli import main

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    uri = [f"train.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    if command[0] == "compare":
        uri = ["--tracking-uri", uri[0].split("=", 1)[1]]
    if command[0] == "bench":  # no MLflow; before: a traceback after the minutes of measuring
        uri = []
    for output, said in (
        (tmp_path, f"{tmp_path} is a folder; give the file to write"),
        (f"file://{tmp_path}", f"file://{tmp_path} is a folder; give the file to write"),
        (a_file / "out.json", f"{a_file / 'out.json'}: {a_file} is a file, not a folder"),
    ):
        capsys.readouterr()
        assert main([*command, str(output), *uri]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"psm: error: {key}") and err.endswith(said), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing written, no run


def test_a_server_that_refuses_fails_at_once_with_its_words(monkeypatch):
    """401 (or 400, 403, 404) from the tracking server: sending again cannot help. Before, the
    batch was held and resent forever, and a run's end waited 15 min for a server that answered
    every time."""
    import http.server
    import threading
    import time

    class Refuses(http.server.BaseHTTPRequestHandler):
        def _refuse(self):
            body = json.dumps({"error_code": "UNAUTHENTICATED", "message": "token expired"})
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        do_GET = do_POST = _refuse

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        cfg = Config(train=TrainConfig(mlflow_uri=f"http://127.0.0.1:{server.server_port}"))
        tracker = Tracker.of(cfg)
        held = [tracking.held_metrics({"loss": 0.5}, 0)]
        refused = "refused the metrics of step 0: UNAUTHENTICATED: token expired"
        with pytest.raises(tracking.TrackingError, match=refused):
            tracker.deliver("run", held)
        started = time.monotonic()
        searched = "refused a search: UNAUTHENTICATED: token expired"
        with pytest.raises(tracking.TrackingError, match=searched):
            tracker.wait_until_reachable(timeout_s=60, poll_s=5)
        assert time.monotonic() - started < 5  # at once, not after the 60 s
    finally:
        server.shutdown()
