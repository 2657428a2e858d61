"""Local paths and pyarrow URIs (s3://, gs://, hdfs://, file://) alike: where job outputs,
detector models and run folders live on a cluster."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from psm_model.files import temporary_name, write_atomic


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """A local path (made absolute) or a pyarrow filesystem URI (s3://, gs://, hdfs://, file://):
    on a cluster the job's working directory is a temporary copy, so results belong in storage
    that outlives it (as train.storage_path)."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


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
