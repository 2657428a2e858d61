"""jobs/provenance.py: the code and data a run names, without Ray or MLflow."""

import hashlib
import json
import shutil
import subprocess

import pytest

from jobs import provenance
from jobs.cli import main as psm


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(provenance.ROOT), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.skipif(
    shutil.which("git") is None or not (provenance.ROOT / ".git").exists(), reason="no checkout"
)
def test_a_checkout_names_its_commit_and_whether_tracked_files_changed():
    state = provenance.git_state()
    assert state["commit"] == _git("rev-parse", "HEAD")
    changed = _git("status", "--porcelain", "--untracked-files=no")
    assert state["dirty"] == ("true" if changed else "false")
    tags = provenance.source_tags("psm train")
    assert tags["mlflow.source.git.commit"] == state["commit"]
    assert tags["psm.source.git_dirty"] == state["dirty"]


def test_without_git_the_commit_comes_from_the_submitting_side(monkeypatch, tmp_path):
    """A submitted job's copy has no .git: `psm job-env` hands the commit over, and without it
    the run still names its code by the source digest."""
    monkeypatch.setattr(provenance, "ROOT", tmp_path)  # no checkout there
    monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
    tags = provenance.source_tags("psm eval")
    assert "mlflow.source.git.commit" not in tags and "no git checkout" in tags["psm.source.git"]
    monkeypatch.setenv(provenance.COMMIT_ENV, "0123abc")
    monkeypatch.setenv(provenance.DIRTY_ENV, "true")
    tags = provenance.source_tags("psm eval")
    assert tags["mlflow.source.git.commit"] == "0123abc" and tags["psm.source.git_dirty"] == "true"
    assert tags["mlflow.source.name"] == "psm eval"


def test_the_source_digest_covers_every_python_file_of_the_packages(tmp_path, monkeypatch):
    for name in ("psm_model/a.py", "jobs/b.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    provenance.source_digest.cache_clear()
    try:
        h = hashlib.sha256()
        for name in ("psm_model/a.py", "jobs/b.py"):  # package order, then path order
            h.update(name.encode() + b"\0" + name.encode() + b"\0")
        assert provenance.source_digest() == h.hexdigest()
        (tmp_path / "jobs/b.py").write_text("changed")
        provenance.source_digest.cache_clear()
        assert provenance.source_digest() != h.hexdigest()
    finally:
        provenance.source_digest.cache_clear()


def test_job_env_adds_the_git_state_to_a_runtime_env(monkeypatch, capsys):
    monkeypatch.setattr(provenance, "git_state", lambda: {"commit": "abc", "dirty": "false"})
    given = {"env_vars": {"A": "1"}, "pip": ["x"]}
    assert provenance.job_env(given) == {
        "env_vars": {"A": "1", "PSM_GIT_COMMIT": "abc", "PSM_GIT_DIRTY": "false"},
        "pip": ["x"],
    }
    assert psm(["job-env", json.dumps(given)]) == 0
    assert json.loads(capsys.readouterr().out)["env_vars"]["PSM_GIT_COMMIT"] == "abc"
    assert psm(["job-env", "[1]"]) == 2


def test_an_annotation_file_is_named_by_its_digest_and_counts(tmp_path):
    class Record:  # pipelines.coco.ImageRecord's one field read here
        def __init__(self, n):
            self.persons = [object()] * n

    ann = tmp_path / "person_keypoints_val2017.json"
    ann.write_text('{"images": []}')
    d = provenance.annotation_dataset(ann, tmp_path / "val2017", [Record(2), Record(0)], "x")
    digest = hashlib.sha256(b'{"images": []}').hexdigest()
    assert d["digest"] == digest[:16]
    assert d["profile"] == {"images": 2, "persons": 2, "sha256": digest}
    assert d["source"] == {"uri": str(ann), "images": str(tmp_path / "val2017")}
