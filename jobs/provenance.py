"""What made a run: the code (git commit, dirty flag, a digest of the package's source, library
versions) and the data (annotation files with a content digest and counts), as MLflow tags and
dataset inputs (`jobs.tracking` logs them). Plus `job_env`, the runtime env that carries the
commit to a submitted job (`psm job-env`, `jobs/job_env.py`).

`ray job submit --working-dir .` runs the job in a copy of the folder without `.git` (Ray's
default excludes), so a job cannot ask git. The submitting side can: `psm job-env` prints the
runtime env that hands the commit and the dirty flag over as PSM_GIT_COMMIT / PSM_GIT_DIRTY, and
without either the run still names its code by the digest of its source files.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
from pathlib import Path, PurePosixPath

from jobs.console import SUBMITTED_JOB_ENV
from pipelines.coco import load_split
from pipelines.uris import join
from psm_model.config import Config
from psm_model.errors import redact_secrets

ROOT = Path(__file__).resolve().parents[1]  # the repository (or the job's copy of it)
PACKAGES = ("psm_model", "pipelines", "jobs", "benchmarks")
COMMIT_ENV, DIRTY_ENV, BRANCH_ENV = "PSM_GIT_COMMIT", "PSM_GIT_DIRTY", "PSM_GIT_BRANCH"
# MLflow's own source tags (shown on the run page) and ours
GIT_COMMIT_TAG = "mlflow.source.git.commit"
GIT_BRANCH_TAG = "mlflow.source.git.branch"
DIRTY_TAG = "psm.source.git_dirty"
DIGEST_TAG = "psm.source.digest"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):  # no git on this node
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict[str, str]:
    """{commit, dirty, branch} of the checkout this code runs from, else of PSM_GIT_* (a
    submitted job), else {}. Dirty: tracked files differ from the commit (new files do not
    count: data and runs live beside the code)."""
    top = _git("rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == ROOT:  # not some repository the package happens to sit in
        commit = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no")
        if commit and status is not None:
            state = {"commit": commit, "dirty": "true" if status else "false"}
            branch = _git("rev-parse", "--abbrev-ref", "HEAD")
            return state | ({"branch": branch} if branch and branch != "HEAD" else {})
    if commit := os.environ.get(COMMIT_ENV, ""):
        state = {"commit": commit, "dirty": os.environ.get(DIRTY_ENV, "unknown")}
        return state | ({"branch": b} if (b := os.environ.get(BRANCH_ENV)) else {})
    return {}


@functools.cache
def source_digest() -> str:
    """sha256 of the package's Python files (relative path and bytes, in path order): the same
    code gives the same digest in a checkout, a job's copy of it or an installed wheel."""
    h = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            h.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("psm-pose", "torch", "ray", "mlflow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def source_tags(command: str) -> dict[str, str]:
    """The MLflow tags naming the code of a run started by `command` (`psm train`, ...)."""
    git = git_state()
    tags = {
        "mlflow.source.name": command,
        "mlflow.source.type": "JOB" if os.environ.get(SUBMITTED_JOB_ENV) else "LOCAL",
        DIGEST_TAG: source_digest(),
        **{f"psm.version.{k}": v for k, v in versions().items()},
    }
    if git:
        tags |= {GIT_COMMIT_TAG: git["commit"], DIRTY_TAG: git["dirty"]}
        tags |= {GIT_BRANCH_TAG: git["branch"]} if "branch" in git else {}
    else:
        tags["psm.source.git"] = (
            f"none: no git checkout at {ROOT} and no {COMMIT_ENV} (see `psm job-env`)"
        )
    return tags


def file_digest(path: str | Path) -> str:
    """sha256 of a file or an object (data.root=s3://...), read in 1 MiB blocks (a COCO train
    file is ~240 MB)."""
    from pipelines.uris import filesystem

    h = hashlib.sha256()
    fs, where = filesystem(str(path))
    with fs.open_input_stream(where) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _name(location: str | Path) -> str:
    return PurePosixPath(str(location).split("?")[0]).name


def annotation_dataset(
    annotations: str | Path, images: str | Path, records: list, context: str
) -> dict:
    """One dataset input of a run: a COCO JSON file (its digest) with the images it names,
    counted as the run read them (`records`: pipelines.coco image records); a local path or a
    URI, shown with any key:secret@ masked."""
    digest = file_digest(annotations)
    return {
        "name": _name(annotations),
        "digest": digest[:16],
        "source": {"uri": redact_secrets(str(annotations)), "images": redact_secrets(str(images))},
        "profile": {
            "images": len(records),
            "persons": sum(len(r.persons) for r in records),
            "sha256": digest,
        },
        "context": context,
    }


def file_dataset(path: str, context: str, digest: str = "", **profile) -> dict:
    """A dataset input for a file of another kind (detections, a detector model)."""
    digest = digest or file_digest(path)
    return {
        "name": _name(path),
        "digest": digest[:16],
        "source": {"uri": redact_secrets(str(path))},
        "profile": {"sha256": digest, **profile},
        "context": context,
    }


def model_description(cfg, run_id: str, run_name: str, metrics: dict) -> str:
    """What a registered model version is: the network, its input and output, the val AP with
    the test recipe it was measured with, the training recipe and the run that made it."""
    m, e, t = cfg.model, cfg.eval, cfg.train
    h, w = m.input_size
    hh, hw = m.heatmap_size
    widths = m.widths or tuple(m.width * k for k in (1, 2, 4, 8))
    ap = metrics.get("val_AP")
    measured = (
        f"val AP {ap:.4f} on {cfg.data.val_annotations}"
        if isinstance(ap, float) and ap >= 0
        else "not validated (train.val_every=0)"
    )
    git = git_state()
    code = f"commit {git['commit'][:12]}" if git else f"source digest {source_digest()[:12]}"
    return (
        f"HRNet-PSM pose model: {m.fusion} fusion, branch widths {list(widths)}, heatmap stride "
        f"{m.heatmap_stride}. Input: N x 3 x {h} x {w} float32 person crops (RGB, ImageNet "
        f"mean/std); output: N x {m.num_joints} x {hh} x {hw} heatmaps (COCO keypoints).\n"
        f"{measured}; test recipe: flip test {'on' if e.flip_test else 'off'}, {e.decode} "
        f"decode, OKS-NMS {e.oks_nms_threshold}, GT boxes unless eval.detections.\n"
        f"Recipe: {t.epochs} epochs, batch {t.batch_size} x {t.num_workers} workers, Adam lr "
        f"{t.lr:g} (x{t.lr_factor:g} at {list(t.lr_steps)}), sigma {cfg.data.sigma:g} heatmap "
        f"px, amp {t.amp}, seed {t.seed}.\n"
        f"Trained by MLflow run {run_id} ({run_name}), {code}."
    )


def job_env(runtime_env: dict | None = None) -> dict:
    """`runtime_env` (a `ray job submit --runtime-env-json` value) with this checkout's git state
    added to its env_vars, for the job to tag its runs with."""
    env = dict(runtime_env or {})
    git = git_state()
    names = {"commit": COMMIT_ENV, "dirty": DIRTY_ENV, "branch": BRANCH_ENV}
    env["env_vars"] = {**env.get("env_vars", {}), **{names[k]: v for k, v in git.items()}}
    return env


def training_datasets(cfg: Config, train_records: list) -> list[dict]:
    """The run's dataset inputs: the train annotations (as read) and, when it validates, the val
    annotations."""
    root = cfg.data.root  # a folder or a URI
    train = annotation_dataset(
        join(root, cfg.data.train_annotations),
        join(root, cfg.data.train_images),
        train_records,
        "training",
    )
    if not cfg.train.val_every:
        return [train]
    val = annotation_dataset(
        join(root, cfg.data.val_annotations),
        join(root, cfg.data.val_images),
        load_split(cfg, "val")[0],
        "validation",
    )
    return [train, val]
