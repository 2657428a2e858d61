"""One live writer per output folder (an inference output's parts, a training run, a sweep): a
LEASE in the folder that one job at a time holds.

- A local path (also an NFS/EFS mount the nodes share): the holder keeps an flock on LEASE. The
  kernel (or the NFS server) drops it when the holder's process dies, so a dead holder never
  blocks a resume and a live one is never taken over. The file stays; only the lock counts.
- s3://: LEASE is an object created only if absent (PUT If-None-Match: *) holding a random token;
  a thread renews it every ttl/4 by a PUT conditional on its ETag. A lease whose ETag does not
  change for `ttl_s` of the taker's own clock is stale (no trust in other hosts' clocks) and is
  taken over by a PUT conditional on that ETag: of several takers one wins.
- Other pyarrow stores (gs://, hdfs://): pyarrow offers no conditional write, so the same steps
  run unconditionally and a warning says two jobs starting together could both proceed.

`check()` is the fencing test before each commit (a part and its manifest, a checkpoint): it
raises LeaseLost unless LEASE still carries this holder's token. `release()` removes only one's
own lease. A lease that cannot be read is retried and then an error, never taken for a dead one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlparse

import pyarrow.fs as pafs

from pipelines.coco import DataError
from pipelines.uris import filesystem
from psm_model.errors import redact_secrets
from psm_model.files import sha256

log = logging.getLogger(__name__)

LEASE = "LEASE"
TTL_S = 20.0  # an object-store lease not renewed for this long is stale
READ_TRIES = 4
DYING_S = 5.0  # how long a local lock is retried before its holder counts as alive


class LeaseLost(DataError):
    """Another job took this job's lease: it must stop writing."""


class Lease:
    """Hold `folder/LEASE` (a local path or URI) until `release()` or the end of a `with` block.
    `what` names the writer in messages ("these parts", "this training run")."""

    def __init__(self, folder: str, what: str, ttl_s: float = TTL_S) -> None:
        self.folder, self.what = folder.rstrip("/"), what
        self.shown = redact_secrets(f"{self.folder}/{LEASE}")
        self.token = uuid.uuid4().hex
        self.mine = {
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.time(),
        }
        self._store = _store(self.folder)
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._take(ttl_s)
        self._renewer = None
        if self._store.renews:
            self._renewer = threading.Thread(
                target=self._renew, args=(ttl_s / 4,), name="psm-lease", daemon=True
            )
            self._renewer.start()

    def _take(self, ttl_s: float) -> None:
        data = json.dumps(self.mine).encode()
        seen, since = None, time.monotonic()
        while True:
            if self._store.create(data):
                return
            holder, etag = self._read()
            if etag is None:
                continue  # released between our create and read: try again
            dying = not self._store.renews and time.monotonic() - since < DYING_S
            if dying:  # a killed job's process may take a moment to go (a Tune trial's actor)
                time.sleep(0.2)
                continue
            if not self._store.renews or (seen is not None and etag != seen):
                # a local flock is held by a live process; an object renewed is alive
                raise DataError(
                    f"{redact_secrets(self.folder)}: another job writes {self.what} (lease "
                    f"{LEASE}: host {holder.get('host')}, pid {holder.get('pid')}); wait for it "
                    "to end"
                )
            if seen is None:
                seen, since = etag, time.monotonic()
                log.info("%s: held; taken over if not renewed within %.0f s", self.shown, ttl_s)
            elif time.monotonic() - since >= ttl_s:
                if self._store.replace(data, etag):
                    log.warning(
                        "%s: took over a lease not renewed for %.0f s (host %s, pid %s)",
                        self.shown, ttl_s, holder.get("host"), holder.get("pid"),
                    )  # fmt: skip
                    return
                seen = None  # another taker won, or the holder came back: look again
                continue
            time.sleep(min(1.0, ttl_s / 8))

    def _read(self) -> tuple[dict, str | None]:
        return _read(self._store, self.shown)

    def _renew(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.mine["renewed"] = time.time()  # new bytes, so a new ETag that takers see
            try:
                if not self._store.renew(json.dumps(self.mine).encode()):
                    self._lost.set()
                    log.error("%s: taken by another job: this job stops writing", self.shown)
                    return
            except OSError as e:  # a blip: the next renewal is within ttl
                log.warning("%s: renewal failed, retrying: %s", self.shown, e)

    def check(self) -> None:
        """The fencing check before a commit."""
        check_held(self.folder, self.token, self.what, self._store, lost=self._lost.is_set())

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with contextlib.suppress(OSError):
            self._store.release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_held(
    folder: str, token: str, what: str, store: _Store | None = None, lost: bool = False
) -> None:
    """The fencing check, also from another process of the holder's job (a training worker):
    LeaseLost unless folder/LEASE still carries `token`."""
    folder = folder.rstrip("/")
    holder, _ = _read(store or _store(folder), redact_secrets(f"{folder}/{LEASE}"))
    if lost or holder.get("token") != token:
        raise LeaseLost(
            f"{redact_secrets(folder)}: another job took the lease of {what} (now host "
            f"{holder.get('host')}, pid {holder.get('pid')}): this job stops before writing"
        )


def _store(folder: str) -> _Store:
    fs, root = filesystem(folder)
    fs.create_dir(root, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        return _LocalFile(f"{root}/{LEASE}")
    if folder.startswith("s3://"):
        return _S3Object(f"{folder}/{LEASE}")
    log.warning(
        "%s: this store has no conditional write through pyarrow: two jobs starting together "
        "on it could both write",
        redact_secrets(folder),
    )
    return _PlainObject(fs, f"{root}/{LEASE}")


def _read(store: _Store, shown: str) -> tuple[dict, str | None]:
    """The holder's record and the lease's version; a read error is retried, then raised."""
    for attempt in range(READ_TRIES):
        try:
            raw, etag = store.read()
            break
        except OSError as e:
            if attempt == READ_TRIES - 1:
                raise DataError(f"{shown}: cannot read the lease: {redact_secrets(str(e))}") from e
            time.sleep(0.5 * 2**attempt)
    try:
        holder = json.loads(raw) if raw else {}
    except ValueError:
        holder = {}  # a local file between truncate and write: its holder is alive
    return holder if isinstance(holder, dict) else {}, etag


class _Store:
    """What a lease needs of where it lives."""

    renews = True  # false where the holder's death frees the lease by itself

    def create(self, data: bytes) -> bool:  # only if absent; True if created
        raise NotImplementedError

    def read(self) -> tuple[bytes, str | None]:  # the bytes and a version tag; None if absent
        raise NotImplementedError

    def replace(self, data: bytes, etag: str) -> bool:  # only if still at version `etag`
        raise NotImplementedError

    def renew(self, data: bytes) -> bool:  # our own, still ours
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError


@dataclass
class _LocalFile(_Store):
    path: str
    fd: int = -1
    renews = False

    def create(self, data: bytes) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self.fd = fd
        return True

    def read(self) -> tuple[bytes, str | None]:
        try:
            with open(self.path, "rb") as f:
                return f.read(), "held"
        except FileNotFoundError:
            return b"", None

    def release(self) -> None:
        # never unlinked: a waiter may have it open, and a new file would let two jobs lock
        if self.fd >= 0:
            os.close(self.fd)  # drops the flock
            self.fd = -1


class _S3Object(_Store):
    """Conditional PUT and DELETE through boto3: pyarrow's S3 has no If-None-Match / If-Match."""

    def __init__(self, uri: str) -> None:
        try:
            import boto3
            from botocore.config import Config as BotoConfig
        except ImportError as e:
            raise DataError(
                f"{redact_secrets(uri)}: a lease on s3:// needs boto3: pip install 'psm-pose[s3]'"
            ) from e
        parts = urlparse(uri)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        endpoint = query.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
        self.bucket = parts.hostname or ""
        self.key = parts.path.lstrip("/")
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint or None,  # else AWS_ENDPOINT_URL, as pyarrow reads it
            region_name=query.get("region") or None,
            aws_access_key_id=unquote(parts.username) if parts.username else None,
            aws_secret_access_key=unquote(parts.password) if parts.password else None,
            config=BotoConfig(retries={"mode": "standard", "max_attempts": 3}),
        )
        self.etag = ""
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError)

    def _put(self, data: bytes, **condition: str) -> bool:
        try:
            reply = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except self._errors as e:
            if _code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                return False
            raise OSError(str(e)) from e
        self.etag = reply["ETag"]
        return True

    def create(self, data: bytes) -> bool:
        return self._put(data, IfNoneMatch="*")

    def read(self) -> tuple[bytes, str | None]:
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self.key)
            return reply["Body"].read(), reply["ETag"]
        except self._errors as e:
            if _code(e) in ("NoSuchKey", "404"):
                return b"", None
            raise OSError(str(e)) from e

    def replace(self, data: bytes, etag: str) -> bool:
        return self._put(data, IfMatch=etag)

    def renew(self, data: bytes) -> bool:
        return self._put(data, IfMatch=self.etag)

    def release(self) -> None:
        with contextlib.suppress(*self._errors):  # not ours any more: leave it
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)


def _code(error: Exception) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


@dataclass
class _PlainObject(_Store):
    """Any other pyarrow store: the same steps, unconditional; the content is the version tag."""

    fs: pafs.FileSystem
    path: str
    data: bytes = b""

    def _write(self, data: bytes) -> bool:
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)
        self.data = data
        return self.read()[0] == data  # a racing writer may have overwritten it

    def create(self, data: bytes) -> bool:
        if self.read()[1] is not None:
            return False
        return self._write(data)

    def read(self) -> tuple[bytes, str | None]:
        try:
            with self.fs.open_input_stream(self.path) as f:
                raw = f.read()
        except FileNotFoundError:
            return b"", None
        return raw, sha256(raw)

    def replace(self, data: bytes, etag: str) -> bool:
        return self.read()[1] == etag and self._write(data)

    def renew(self, data: bytes) -> bool:
        return self.read()[0] == self.data and self._write(data)

    def release(self) -> None:
        if self.read()[0] == self.data:
            self.fs.delete_file(self.path)
