"""jobs/console.py: what reaches the console while a command runs, and the per-epoch line."""

import logging
import os
import stat
import sys

import pytest

from jobs import console

PREFIX = "\x1b[36m(RayTrainWorker pid=31141)\x1b[0m "  # as Ray prints a worker's line


def test_quiet_shows_our_lines_and_files_the_chatter(tmp_path, capsys):
    log = tmp_path / "logs" / "demo.log"
    with console.quiet(log):
        print("== training 10 epochs")
        print(PREFIX + "Execution plan of Dataset d_0: InputDataBuffer[Input] -> MapBatches")
        print(PREFIX + console.PROGRESS + "[##--] epoch 1/2")
        print(PREFIX + console.PROGRESS + "[##--] epoch 1/2", file=sys.stderr)  # Ray Train's copy
        print(
            "2026-11-30 11:15:42,824\tINFO streaming_executor.py:215 -- Starting", file=sys.stderr
        )
        print("2026/11/30 11:15:49 INFO mlflow.store.db.utils: Updating database tables")
        print("Successfully registered model 'psm_model'.")
        sys.stdout.write("(MapWorker(MapBatches(_Predict)) pid=7, ip=192.0.2.2) a row\nrest ")
        sys.stdout.write("of our line\n")
        print("11:15:52 WARNING jobs.train: ours, kept", file=sys.stderr)
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "== training 10 epochs",
        f"(Ray's and the libraries' output: {log}; -v shows it)",
        "[##--] epoch 1/2",
        "rest of our line",
    ]
    assert err.splitlines() == ["11:15:52 WARNING jobs.train: ours, kept"]
    assert log.read_text().splitlines() == [
        "(RayTrainWorker pid=31141) Execution plan of Dataset d_0: InputDataBuffer[Input] -> "
        "MapBatches",
        "2026-11-30 11:15:42,824\tINFO streaming_executor.py:215 -- Starting",
        "2026/11/30 11:15:49 INFO mlflow.store.db.utils: Updating database tables",
        "Successfully registered model 'psm_model'.",
        "(MapWorker(MapBatches(_Predict)) pid=7, ip=192.0.2.2) a row",
    ]
    print("after: not filtered")
    assert capsys.readouterr().out == "after: not filtered\n"


def test_quiet_without_chatter_writes_no_file(tmp_path, capsys):
    with console.quiet(tmp_path / "x.log"):
        print("only ours")
    assert capsys.readouterr().out == "only ours\n" and not (tmp_path / "x.log").exists()


def test_the_log_goes_to_a_new_file_in_a_folder_of_this_users_only(tmp_path, monkeypatch):
    """Before: $TMPDIR/psm-logs, 0755 and shared, names of a stamp and a pid opened for append:
    another user could read the chatter or plant the next file (a link) there."""
    monkeypatch.setattr(console.tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(console.SUBMITTED_JOB_ENV, raising=False)
    first, second = console.log_file(False, "demo"), console.log_file(False, "demo")
    assert first != second and first.parent == tmp_path / f"psm-logs-{os.getuid()}"
    assert stat.S_IMODE(first.parent.stat().st_mode) == 0o700
    with console.quiet(first):
        print("(pid=1) a line of chatter")
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    second.symlink_to(tmp_path / "elsewhere")  # planted where the next log would go
    with pytest.raises(FileExistsError), console.quiet(second):
        print("(pid=1) chatter")
    assert not (tmp_path / "elsewhere").exists()
    first.parent.chmod(0o755)  # not private any more: a fresh folder instead
    assert console.log_file(False, "demo").parent != first.parent


def test_verbose_and_submitted_jobs_show_everything(monkeypatch):
    monkeypatch.delenv(console.SUBMITTED_JOB_ENV, raising=False)
    assert console.log_file(True, "demo") is None
    assert console.log_file(False, "demo").name.startswith("demo-")
    monkeypatch.setenv(console.SUBMITTED_JOB_ENV, "{}")  # the driver of `ray job submit`
    assert console.log_file(False, "demo") is None


def test_epoch_line():
    metrics = {"epochs_done": 3, "train_loss": 0.0012345, "samples_per_s": 31.24}
    assert console.epoch_line(metrics, 10, 41.2, width=10) == (
        "[###-------] epoch 3/10 loss 0.00123, 31.2 samples/s, 41 s, ETA 4m48s"
    )
    metrics |= {"epochs_done": 10, "val_AP": 0.25, "best_AP": 0.3}
    assert console.epoch_line(metrics, 10, 5, width=4) == (
        "[####] epoch 10/10 loss 0.00123, 31.2 samples/s, 5 s, ETA 0s, AP 0.2500 (best 0.3000)"
    )
    # a sweep's trial names itself: two trials' lines side by side differ
    assert console.epoch_line(metrics, 10, 5, width=4, label="w48 σ2.5").startswith(
        "w48 σ2.5 [####] epoch 10/10"
    )
    metrics = {**metrics, "data_wait_frac": 0.4249, "data_samples_per_s": 52.6}
    assert console.epoch_line(metrics, 10, 5, width=4) == (
        "[####] epoch 10/10 loss 0.00123, 31.2 samples/s, 5 s, ETA 0s, data wait 42% "
        "(data side 53/s), AP 0.2500 (best 0.3000)"
    )


def test_quiet_reaches_log_handlers_made_before(tmp_path, capsys):
    # Ray and MLflow make their handlers at import, holding the stderr of that moment
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(message)s"))
    logger = logging.getLogger("test_console.ray_like")
    logger.addHandler(handler)
    logger.propagate = False
    log = tmp_path / "x.log"
    try:
        with console.quiet(log):
            logger.warning("worker.py:2029 -- Started a local Ray instance.")
        assert handler.stream is sys.stderr  # given back
    finally:
        logger.removeHandler(handler)
    assert "Started a local Ray instance" not in capsys.readouterr().err
    assert "WARNING worker.py:2029 -- Started a local Ray instance." in log.read_text()
