"""A training run's folder (train.storage_path/train.name) and what it keeps: the run's config
(saved once its data and MLflow run are in hand, checked when the run resumes), the best
checkpoint kept beside Ray's newest ones, the fallback from a corrupt newest checkpoint, and
unique default run names. Used by `jobs.training` and its worker loop (`jobs.train_loop`); Ray
calls are marked `# Ray`.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from pipelines.uris import filesystem, write_bytes
from psm_model import config_fields
from psm_model.checkpoint import CURRENT, TrainState, load_first_good
from psm_model.config import Config, ConfigError
from psm_model.config_yaml import parse_config
from psm_model.errors import redact_secrets
from psm_model.files import write_atomic

if TYPE_CHECKING:  # imported where used: keep-best and the config checks need no Ray
    import ray.train

log = logging.getLogger(__name__)

BEST = "best_checkpoint"  # in the run folder, beside Ray's checkpoint_* folders
RUN_CONFIG = "psm_config.yaml"  # in the run folder: the config a resumed run must match
# what a resumed run may change freely: the fields tagged so (psm_model/config_fields.py)
FREE_ON_RESUME = config_fields.keys_tagged(Config(), config_fields.FREE_ON_RESUME)


def default_run_name(cfg: Config) -> str:
    """A new run's name: readable, and unique even for runs started in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.model.fusion}-w{cfg.model.width}-{stamp}-{uuid.uuid4().hex[:6]}"


def location(cfg: Config) -> str:
    return f"{cfg.train.storage_path.rstrip('/')}/{cfg.train.name}"


def keep_best(cfg: Config, directory: str | Path, epoch: int) -> None:
    """Copy a checkpoint folder into the run folder's best_checkpoint as a new generation, then
    make it current (CURRENT, one small file replaced atomically, names it), then remove the
    older ones: a kill at any point leaves CURRENT naming a complete checkpoint, on a disk and on
    object stores (which rename no folders). Ray keeps only the newest train.keep_checkpoints."""
    best = f"{location(cfg)}/{BEST}"
    fs, root = filesystem(best)
    name = f"gen-{epoch:04d}-{uuid.uuid4().hex[:8]}"
    local = isinstance(fs, pafs.LocalFileSystem)
    for path in sorted(Path(directory).iterdir()):
        if local:
            write_atomic(f"{root}/{name}/{path.name}", path.read_bytes())  # synced to disk
        else:  # an object appears whole or not at all
            with fs.open_output_stream(f"{root}/{name}/{path.name}") as out:
                out.write(path.read_bytes())
    write_bytes(f"{best}/{CURRENT}", name.encode())
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.base_name in (CURRENT, name):
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        else:  # a best folder of the earlier layout: its files, now superseded
            fs.delete_file(info.path)


def restore(checkpoint: ray.train.Checkpoint, model, optimizer, scheduler, scaler) -> TrainState:
    """Load the newest checkpoint Ray hands back; if it is corrupt, the run folder's older ones
    (newest first), then its best one, each failure logged naming the file."""
    fs = checkpoint.filesystem
    run_dir = checkpoint.path.rstrip("/").rsplit("/", 1)[0]
    infos = fs.get_file_info(pafs.FileSelector(run_dir))
    older = sorted(
        (
            i.path
            for i in infos
            if i.type == pafs.FileType.Directory
            and i.base_name.startswith("checkpoint_")
            and i.path != checkpoint.path
        ),
        reverse=True,  # Ray names them checkpoint_<timestamp>
    )
    best = [i.path for i in infos if i.base_name == BEST]
    with contextlib.ExitStack() as stack:

        def local_dirs() -> Iterator[str]:  # fetched one at a time, only while needed
            yield private_copy(checkpoint, stack)
            for path in [*older, *best]:
                import ray.train

                yield private_copy(ray.train.Checkpoint(path, filesystem=fs), stack)  # Ray

        state, used = load_first_good(local_dirs(), model, optimizer, scheduler, scaler)
    if Path(used).name != Path(checkpoint.path).name:
        log.warning("resumed from %s: the newest checkpoint %s is unusable", used, checkpoint.path)
    return state


def private_copy(checkpoint: ray.train.Checkpoint, stack: contextlib.ExitStack) -> str:
    """The checkpoint in a folder of this process's own, removed when `stack` closes.
    `Checkpoint.as_directory()` shares one /tmp folder per checkpoint between the processes of a
    node (the ranks, the driver); a resumed run from s3:// once failed in all of them on one
    truncated model.pt there."""
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="psm-ckpt-"))
    return checkpoint.to_directory(folder)  # Ray: downloads from storage (s3://...) if remote


def check_resume_config(cfg: Config) -> None:
    """A resumed run must match the config its run folder saved (`save_run_config`), except in
    the FREE_ON_RESUME keys and those listed in train.resume_changes. Keys missing on either side
    (added or removed in the code since) are ignored. A new run passes."""
    unknown = sorted(set(cfg.train.resume_changes) - set(cfg.flat()))
    if unknown:  # a typo would otherwise accept nothing and refuse the resume anyway
        raise ConfigError(f"train.resume_changes: unknown keys {unknown} (expected section.key)")
    path = f"{location(cfg)}/{RUN_CONFIG}"
    fs, where = filesystem(path)
    if fs.get_file_info(where).type == pafs.FileType.File:
        with fs.open_input_stream(where) as f:
            first = parse_config(f.read().decode(), path).flat()
        now = parse_config(redact_secrets(cfg.to_yaml()), "<config>").flat()  # as saved
        allowed = FREE_ON_RESUME | set(cfg.train.resume_changes)
        changed = [
            f"{k}: {first[k]!r} -> {now[k]!r}"
            for k in first
            if k in now and now[k] != first[k] and k not in allowed
        ]
        if changed:
            raise ConfigError(
                f"{path}: run {cfg.train.name!r} was started with other values "
                f"({'; '.join(changed)}). Resuming would train a mix of both. Accept the change "
                "with train.resume_changes=[KEY, ...], or start a new run (another train.name)"
            )


def save_run_config(cfg: Config) -> None:
    """The config a resume is checked against (updated by an accepted change): saved once the
    run's data and MLflow run are in hand, so a start that failed before (a wrong data.root)
    leaves nothing that refuses the corrected command."""
    write_bytes(f"{location(cfg)}/{RUN_CONFIG}", redact_secrets(cfg.to_yaml()).encode())
