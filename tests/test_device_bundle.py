"""The GPU machine's bundle (benchmarks/device_bundle.py): the completeness proof on small
made-up bundles (offline, seconds), then the real bundle built once from PyPI (slow): complete
for Python 3.12, within its size, and installed offline into a folder as on the machine."""

import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from benchmarks import device_bundle as db

PYDANTIC = db.pins()["pydantic"]


def _fake_bundle(root: Path, ray_requires: list[str], wheels: dict[str, tuple[str, ...]]) -> Path:
    """A bundle of metadata-only wheels: this project needing Ray (and mlflow, which becomes
    mlflow-skinny + its store), a Ray archive holding only its METADATA, and `wheels`."""
    bundle = root / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    project = ("Requires-Dist: ray[default]>=2.50", "Requires-Dist: mlflow>=3.0")
    project += ("Requires-Dist: optuna>=3.6", 'Requires-Dist: pytest>=9; extra == "test"')
    db._metadata_wheel(bundle / "wheels", "psm-pose", "0.1.0", project)
    for name in ("mlflow-skinny", "sqlalchemy", "alembic", "cryptography"):
        db._metadata_wheel(bundle / "wheels", name, db.pins()[name])
    for name, requires in wheels.items():
        name, version = name.split("==")
        db._metadata_wheel(bundle / "wheels", name, version, requires)
    ray = db._metadata_wheel(root, "ray", "2.60.0", ("Provides-Extra: default", *ray_requires))
    with tarfile.open(bundle / "ray-2.60.0-stripped.tar.xz", "w:xz") as tar:
        tar.add(_unzipped(ray, root / "ray"), arcname="ray-2.60.0.dist-info")
    return bundle


def _unzipped(wheel: Path, folder: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(folder)
    return folder / "ray-2.60.0.dist-info"


def test_roots_are_the_projects_needs_with_the_mlflow_client_and_without_left_out(tmp_path):
    bundle = _fake_bundle(tmp_path, [], {})
    assert db.roots(db.project_wheel(bundle)) == [
        "ray[default]>=2.50",
        "mlflow-skinny>=3.0",  # the client, and what its sqlite store imports
        "sqlalchemy",
        "alembic",
        "cryptography",
    ]  # optuna: LEFT_OUT; pytest: an extra


def test_the_check_resolves_rays_needs_from_its_metadata_and_the_machines_packages(tmp_path):
    requires = (
        "Requires-Dist: pydantic<3,>=2.5; extra == 'default'",
        "Requires-Dist: numpy>=1.20",  # the machine's
        "Requires-Dist: virtualenv>=20; extra == 'default'",  # LEFT_OUT
        "Requires-Dist: tensorboardx; extra == 'train'",  # an extra not asked for
    )
    bundle = _fake_bundle(tmp_path, list(requires), {f"pydantic=={PYDANTIC}": ()})
    report = db.check(bundle)
    assert report["brought"] == {
        "alembic": db.pins()["alembic"],
        "cryptography": db.pins()["cryptography"],
        "mlflow-skinny": db.pins()["mlflow-skinny"],
        "pydantic": PYDANTIC,
        "ray": "2.60.0",
        "sqlalchemy": db.pins()["sqlalchemy"],
    }
    assert report["from_the_machine"] == {"numpy": "2.5.2"}  # device_site.txt's
    assert report["left_out_although_required"] == ["virtualenv"]


def test_the_check_fails_on_a_missing_an_unused_or_a_machine_wheel(tmp_path):
    needs_pydantic = ["Requires-Dist: pydantic>=2.5; extra == 'default'"]
    with pytest.raises(RuntimeError, match="ray.default. 2.60.0 depends on pydantic>=2.5"):
        db.check(_fake_bundle(tmp_path / "missing", needs_pydantic, {}))
    unused = _fake_bundle(tmp_path / "unused", [], {f"pydantic=={PYDANTIC}": ()})
    with pytest.raises(RuntimeError, match=r"unused wheels.*pydantic-"):
        db.check(unused)
    numpy = _fake_bundle(tmp_path / "machine", ["Requires-Dist: numpy"], {"numpy==2.5.2": ()})
    with pytest.raises(RuntimeError, match=r"brought although not to be.*numpy-2\.5\.2"):
        db.check(numpy)


def test_the_check_holds_requirements_that_apply_on_the_machines_python_only(tmp_path):
    """pip evaluates markers for the Python it runs on: a need of Python 3.12 alone, unmet by
    the bundle, passes pip here and must fail the check."""
    requires = [
        f"Requires-Dist: pydantic>=2.5; python_version < '{db.PYTHON}' and extra == 'default'",
        f"Requires-Dist: pydantic>=99; python_version >= '{db.PYTHON}' and extra == 'default'",
    ]
    bundle = _fake_bundle(tmp_path, requires, {f"pydantic=={PYDANTIC}": ()})
    with pytest.raises(RuntimeError, match=rf"unmet on Python {db.PYTHON} only.*pydantic>=99"):
        db.check(bundle)


def test_stripped_ray_leaves_out_java_rllib_llm_and_source_maps_and_keeps_modes(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    wheel = tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl"
    files = {
        "ray/__init__.py": 0o644,
        "ray/core/src/ray/raylet/raylet": 0o755,
        "ray/dashboard/client/build/main.js": 0o644,
        "ray/dashboard/client/build/main.js.map": 0o644,
        "ray/jars/ray_dist.jar": 0o644,
        "ray/rllib/__init__.py": 0o644,
        "ray/llm/__init__.py": 0o644,
        "ray-2.60.0.dist-info/METADATA": 0o644,
    }
    with zipfile.ZipFile(wheel, "w") as z:
        for name, mode in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | mode) << 16
            z.writestr(info, name)
    archive = db.stripped_ray(wheel)
    assert db.stripped_ray(wheel) == archive  # the second time from the cache
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "ray-2.60.0.dist-info/METADATA",  # first: `check` reads it without unpacking the rest
        "ray/__init__.py",
        "ray/core/src/ray/raylet/raylet",
        "ray/dashboard/client/build/main.js",
    ]
    assert members[2].mode == 0o755


# ----------------------------------------------------------------------------------------------
# The real bundle (PyPI; Ray's archive is cached in ~/.cache/psm-pose after the first build)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_bundle")
    return out, db.build(out)


@pytest.mark.slow
def test_the_bundle_is_complete_for_the_machines_python_and_fits_the_device_tool(built):
    _, report = built  # `build` ends with `check`, which raises on anything missing
    assert report["python"] == "3.12"
    assert report["sizes_mib"]["total"] <= db.LIMIT_MIB
    brought = report["brought"]
    for name in ("ray", "mlflow-skinny", "sqlalchemy", "alembic", "pycocotools", "pydantic"):
        assert name in brought
    assert {"opencensus", "tensorboardx"} <= brought.keys()  # ray's default and train extras
    assert {"torch", "numpy", "pyarrow", "grpcio"} <= report["from_the_machine"].keys()
    assert report["left_out_although_required"] == ["virtualenv"]
    assert not {"mlflow", "optuna", "matplotlib", "scikit-learn", "flask"} & brought.keys()


@pytest.mark.slow
def test_the_bundle_installs_offline_into_a_folder(built, tmp_path):
    bundle, _ = built
    site = tmp_path / "site"
    db.install(bundle, site, db.target())  # the machine's wheels, on this Python
    for package in ("ray", "mlflow", "sqlalchemy", "alembic", "pycocotools", "jobs", "psm_model"):
        assert (site / package / "__init__.py").is_file(), package
    assert not {"jars", "rllib", "llm"} & {p.name for p in (site / "ray").iterdir()}
    assert not list((site / "ray" / "dashboard").rglob("*.map"))
    assert os.access(site / "ray/core/src/ray/raylet/raylet", os.X_OK)
    assert (site / "ray-2.60.0.dist-info" / "METADATA").is_file()  # Ray knows its version
