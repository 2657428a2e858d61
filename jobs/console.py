"""What a user reads on the console: our lines, one progress line per epoch, the summaries.

Ray forwards every worker's output to the driver (`log_to_driver`), prefixed `(Name pid=N)`, and
Ray, Ray Data and MLflow log their internals there too: execution plans, resource requests,
checkpoint paths. While a command runs, `quiet` sends those lines to a log file (its path printed
once) and passes the rest; a worker's line meant for the user carries `PROGRESS` (see `progress`).
`psm -v` shows everything, and so does a job under `ray job submit`, whose driver output is the
job log (`ray job logs`) and should stay complete.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import secrets
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

PROGRESS = "[psm] "  # starts a worker's line that the driver shows (without the Ray prefix)
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for the driver of a submitted job

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# worker lines `(RayTrainWorker pid=12, ip=..)`, `(MapWorker(MapBatches(f)) pid=3)`, `(raylet)`
_WORKER_PREFIX = re.compile(r"\(.*?(?:pid=\d+|raylet|autoscaler)[^)]*\) ?")
_CHATTER = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\t(?:DEBUG|INFO|WARNING) "  # Ray's driver-side logging
    r"|\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (?:DEBUG|INFO|WARNING) mlflow"  # MLflow's
    r"|\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIW] \d+ \d+\]"  # Ray's C++ core
    r"|Successfully registered model '|Created version '"  # MLflow's prints (jobs.tracking logs it)
)


def progress(text: str) -> None:
    """A line for the user from a Ray worker (rank 0): shown on the driver's console."""
    print(PROGRESS + text, flush=True)


def epoch_line(metrics: dict, epochs: int, seconds: float, width: int = 20, label: str = "") -> str:
    """`[#####---] epoch 3/10 loss 0.00123, 31.2 samples/s, 41 s, ETA 4m47s, AP 0.1234`: the
    end of epoch `metrics` (jobs.train_loop), `seconds` the epoch with its validation; a sweep's
    trial starts it with its `label` (`w48 σ2.5`), so the lines of trials side by side differ."""
    done = metrics["epochs_done"]
    filled = round(width * done / max(epochs, 1))
    line = (
        f"{label + ' ' if label else ''}"
        f"[{'#' * filled}{'-' * (width - filled)}] epoch {done}/{epochs} "
        f"loss {metrics['train_loss']:.5f}, {metrics['samples_per_s']:.1f} samples/s, "
        f"{seconds:.0f} s, ETA {_minutes(seconds * (epochs - done))}"
    )
    if "data_wait_frac" in metrics:  # which side bounds the run
        line += (
            f", data wait {100 * metrics['data_wait_frac']:.0f}% "
            f"(data side {metrics['data_samples_per_s']:.0f}/s)"
        )
    if "val_AP" in metrics:
        line += f", AP {metrics['val_AP']:.4f} (best {metrics['best_AP']:.4f})"
    return line


def _minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class _Filter(io.TextIOBase):
    """A stream that passes our lines to `stream` and writes the chatter to `log`."""

    def __init__(self, stream: TextIO, log: _LogFile) -> None:
        self.stream, self.log, self.active = stream, log, True
        self._partial = threading.local()  # Ray's log thread and ours write at once

    def write(self, text: str) -> int:
        if not self.active:  # a handler that kept this stream after `quiet` ended
            return self.stream.write(text)
        buffered = getattr(self._partial, "text", "") + text
        *lines, self._partial.text = buffered.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        plain = _ANSI.sub("", line)
        prefix = _WORKER_PREFIX.match(plain)
        if prefix and plain[prefix.end() :].startswith(PROGRESS):
            self.log.show_once(plain[prefix.end() + len(PROGRESS) :], self.stream)
        elif prefix or _CHATTER.match(plain):
            self.log.write(plain, self.stream)
        else:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        if text := getattr(self._partial, "text", ""):
            self._partial.text = ""
            self._line(text)
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


class _LogFile:
    """Opened at the first line: a command that has no chatter leaves no file."""

    def __init__(self, path: Path) -> None:
        self.path, self.file, self.lock = path, None, threading.Lock()
        self.shown: set[str] = set()

    def show_once(self, progress: str, console: TextIO) -> None:
        """Ray Train (v2) also logs a worker's stdout to its stderr: the driver gets each
        progress line twice, once per stream."""
        with self.lock:
            if progress not in self.shown:
                self.shown.add(progress)
                console.write(progress + "\n")

    def write(self, line: str, console: TextIO) -> None:
        with self.lock:
            if self.file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # a new file of this user's only: never one another process made or linked
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                self.file = os.fdopen(fd, "w", buffering=1)  # closed by `quiet`
                console.write(f"(Ray's and the libraries' output: {self.path}; -v shows it)\n")
            self.file.write(line + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def log_file(verbose: bool, command: str) -> Path | None:
    """Where `quiet` sends the chatter of `command`; None: everything on the console."""
    if verbose or os.environ.get(SUBMITTED_JOB_ENV):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return _log_folder() / f"{command}-{stamp}-{os.getpid()}-{secrets.token_hex(3)}.log"


def _log_folder() -> Path:
    """This user's own folder for the logs, $TMPDIR/psm-logs-UID (0700: the chatter holds paths
    and hosts, and no other user may plant a file or link there); one of that name that is not
    this user's private folder is passed over for a fresh one."""
    folder = Path(tempfile.gettempdir()) / f"psm-logs-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return Path(tempfile.mkdtemp(prefix="psm-logs-"))
    return folder


@contextlib.contextmanager
def quiet(log_path: Path | None) -> Iterator[None]:
    """While the command runs, Ray's and the libraries' lines go to `log_path`."""
    if log_path is None:
        yield
        return
    log = _LogFile(log_path)
    out, err = _Filter(sys.stdout, log), _Filter(sys.stderr, log)
    # log handlers made before (Ray's, MLflow's, ours) hold the streams themselves
    handlers = [h for h in _stream_handlers() if h.stream in (out.stream, err.stream)]
    for h in handlers:
        h.setStream(out if h.stream is out.stream else err)
    sys.stdout, sys.stderr = out, err
    try:
        yield
    finally:
        for f in (out, err):
            f.flush()
            f.active = False
        sys.stdout, sys.stderr = out.stream, err.stream
        for h in handlers:
            h.setStream(h.stream.stream)
        log.close()


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return [
        h
        for lg in loggers
        if isinstance(lg, logging.Logger)
        for h in lg.handlers
        if type(h) is not logging.FileHandler and isinstance(h, logging.StreamHandler)
    ]
