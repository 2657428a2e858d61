"""Crash-safe files: atomic writes with unique temporaries, the parts folder's lease, and parts
verified against the sha256 in the manifest (a corrupt part is redone, naming it)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines.coco import DataError
from pipelines.inference import PartStore
from psm_model.files import temporary_name, write_atomic

REPO = Path(__file__).resolve().parents[1]
INPUTS = {"weights_sha256": "a", "part_images": 4}


def test_write_atomic_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "results.json"
    write_atomic(target, "old")
    assert target.read_text() == "old"

    def dies_halfway(f):
        f.write(b"half of the new cont")
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, dies_halfway)
    assert target.read_text() == "old"  # the old file, never half of the new one
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    # two writers of one file never share a temporary (a shared NAME.tmp once gave NUL bytes)
    assert temporary_name(target) != temporary_name(target)
    assert temporary_name(target).parent == target.parent


def _hold_lease(folder: Path) -> subprocess.Popen:
    """Another process (another `psm infer` job) that takes the lease of `folder` and sleeps."""
    code = textwrap.dedent(f"""
        import sys, time
        from pipelines.inference import PartStore
        store = PartStore({str(folder)!r}, {{"weights_sha256": "b", "part_images": 4}})
        print("holding", flush=True)
        time.sleep(60)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True
    )
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_concurrent_job_is_refused_until_the_first_is_gone(tmp_path):
    folder = tmp_path / "out.json.parts"
    holder = _hold_lease(folder)
    try:
        # before: both jobs passed the manifest check and wrote parts into one folder
        with pytest.raises(
            DataError,
            match=rf"{folder}: another job writes these parts .*pid "
            rf"{holder.pid}",
        ):
            PartStore(str(folder), INPUTS)
    finally:
        holder.send_signal(signal.SIGKILL)  # a real kill: no release, the file stays behind
        holder.wait()
    assert json.loads((folder / "LEASE").read_text())["pid"] == holder.pid
    # the holder is gone, and its lock with it: taken at once; its manifest still refuses
    with pytest.raises(DataError, match="other inputs"):
        PartStore(str(folder), INPUTS)
    their_inputs = {"weights_sha256": "b", "part_images": 4}
    with PartStore(str(folder), their_inputs) as store:  # the lease was released on the error
        assert json.loads((folder / "LEASE").read_text())["pid"] == os.getpid()
        assert store.done(2) == []


def test_a_corrupt_or_unrecorded_part_is_redone_and_named(tmp_path, caplog):
    folder = tmp_path / "p"
    with PartStore(str(folder), INPUTS) as store:
        for k in range(3):
            store.write(k, {"results": [{"score": k}]})
    part1 = folder / "part-00001.json"
    part1.write_bytes(b"\0" * len(part1.read_bytes()))  # what two writers of one tmp once made
    (folder / "part-00003.json").write_text('{"results": []}')  # a file the manifest never saw
    with PartStore(str(folder), INPUTS) as store:
        assert store.done(4) == [0, 2]  # before: [0, 1, 2, 3]
        assert f"{part1}: corrupt or missing" in caplog.text
        # read directly, a corrupt part names its file (before: a bare JSONDecodeError)
        with pytest.raises(DataError, match=rf"{folder}/part-00001.json: unreadable or not JSON"):
            store.read(1)
        store.write(1, {"results": []})
        assert store.done(4) == [0, 1, 2]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["part_sha256"]) == [
        "part-00000.json",
        "part-00001.json",
        "part-00002.json",
    ]


def test_json_nested_too_deeply_is_an_error_naming_the_file(tmp_path):
    """100k nested '[' (a hostile or broken image-info file) is a one-line error, not Python's
    RecursionError traceback."""
    from pipelines.coco import load_images

    info = tmp_path / "image_info.json"
    info.write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=f"{info}: nested too deeply to read as JSON"):
        load_images(tmp_path / "images", info)
