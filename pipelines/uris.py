"""Local paths and pyarrow URIs (s3://, gs://, hdfs://, file://) alike: where job outputs,
detector models and run folders live on a cluster."""

from __future__ import annotations

import functools
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from psm_model.errors import redact_secrets
from psm_model.files import parse_json, read_json, temporary_name, write_atomic


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """A local path (made absolute) or a pyarrow filesystem URI (s3://, gs://, hdfs://, file://):
    on a cluster the job's working directory is a temporary copy, so results belong in storage
    that outlives it (as train.storage_path)."""
    if "://" in path:
        parts = urlsplit(path)
        if parts.scheme in ("s3", "gs"):  # made once per process and bucket: a Ray task reads
            # an image per call, and each new S3 client resolves the bucket's region first
            base = f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")
            bucket = parts.hostname or ""
            return _bucket_filesystem(base), f"{bucket}{unquote(parts.path)}".rstrip("/")
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


@functools.lru_cache(maxsize=32)
def _bucket_filesystem(base: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(base)[0]


def join(root: str, path: str) -> str:
    """`path` under `root` (a local folder or a URI) unless it is absolute or a URI itself."""
    if "://" in path or Path(path).is_absolute():
        return path
    if "://" in root:
        base, sep, query = root.partition("?")  # s3://bucket/coco?region=...: the path first
        return f"{base.rstrip('/')}/{path.lstrip('/')}{sep}{query}"
    return str(Path(root) / path)


def read_bytes(location: str) -> bytes:
    """A local file or an object; FileNotFoundError if absent, OSError if unreadable."""
    if "://" not in location:
        return Path(location).read_bytes()
    fs, where = filesystem(location)
    with fs.open_input_stream(where) as f:
        return f.read()


def read_json_at(
    location: str, error: type[Exception] = ValueError, drop: frozenset[str] = frozenset()
) -> object:
    """`psm_model.files.read_json` of a local path or URI; the message names the location with
    any key:secret@ masked."""
    if "://" not in location:
        return read_json(location, error, drop)
    shown = redact_secrets(location)
    try:
        data = read_bytes(location)
    except FileNotFoundError:
        raise error(f"{shown}: cannot read: not found") from None
    except OSError as e:
        raise error(f"{shown}: cannot read: {redact_secrets(str(e))}") from e
    return parse_json(data, shown, error, drop)


def copy_to_local(
    location: str, folder: str | Path, what: str = "file", error: type[Exception] = OSError
) -> Path:
    """The file or folder at a URI copied into the local `folder` under its own name (a cluster's
    s3:// checkpoints, read by code that takes local paths); `error` names the location, with any
    key:secret@ masked, when it is absent (`what` not found) or cannot be read (a bad URI, no
    access, no network)."""
    shown = redact_secrets(location)
    try:
        fs, where = filesystem(location)
        local = Path(folder) / Path(where.rstrip("/")).name
        kind = fs.get_file_info(where).type
        if kind == pafs.FileType.Directory:
            local.mkdir()
        if kind != pafs.FileType.NotFound:
            pafs.copy_files(
                where,
                str(local),
                source_filesystem=fs,
                destination_filesystem=pafs.LocalFileSystem(),
            )
    except (OSError, pa.ArrowException) as e:
        raise error(f"{shown}: cannot read: {redact_secrets(str(e))}") from e
    if kind == pafs.FileType.NotFound:
        raise error(f"{shown}: {what} not found")
    return local


def write_bytes(path: str, data: bytes) -> None:
    """Write a local path or URI by a unique temporary name and a move: a crash leaves the old file
    or none, never half of one, and two writers never share a temporary."""
    if "://" not in path:
        write_atomic(path, data)  # also synced to disk, file and folder
        return
    fs, where = filesystem(path)
    fs.create_dir(where.rsplit("/", 1)[0], recursive=True)
    tmp = str(temporary_name(where))
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, where)
