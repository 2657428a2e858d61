"""The folder a GPU-machine run takes along (issue 28): what that machine lacks for `psm train`,
`psm eval`, `psm infer` and the benches, installed there with no network.

The machine (Python 3.12, x86_64, no network) has torch and the packages of
`benchmarks/device_site.txt`; the bundle brings the rest:

- Ray, stripped of what no run imports (its Java jars, RLlib, Ray LLM, the dashboard's source
  maps), as one xz tar: a fifth of its wheel's unpacked size;
- cp312 manylinux wheels of every other package the run needs and the machine has not, at this
  project's pins (requirements-cluster.txt);
- this project's own wheel, whose declared dependencies are the starting point: `mlflow` is
  replaced by its client `mlflow-skinny` with what its sqlite store imports (the rest of `mlflow`
  is its server, UI and model flavours: scikit-learn, scipy, matplotlib, gunicorn, docker,
  graphene, ...), and LEFT_OUT names what is required on paper but imported by no GPU run.

`check` proves the bundle complete for the machine's Python with pip's own resolver, offline.

    PY=.venv/bin/python bash benchmarks/device_bundle.sh .device_bundle    # build, check
    python3 -m benchmarks.device_bundle install .device_bundle /tmp/psm-site  # on the machine
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICE_SITE = Path(__file__).with_name("device_site.txt")
PINS = REPO / "requirements-cluster.txt"
PYTHON = "3.12"  # the GPU machine's (3.12.3)
# pip matches each manylinux_2_N tag exactly: these are the ones it may take. glibc 2.28 (RHEL 8)
# is below any Python 3.12 system's, and every package needed has a wheel at or under it.
PLATFORMS = ("manylinux2014_x86_64", *(f"manylinux_2_{n}_x86_64" for n in range(17, 29)))
# mlflow's client, and what its sqlite store imports: sqlalchemy, alembic (the schema migrations)
# and cryptography (the model registry's tables, mlflow/store/model_registry/dbmodels/models.py)
INSTEAD = {"mlflow": ("mlflow-skinny", "sqlalchemy", "alembic", "cryptography")}
LEFT_OUT = {  # required (by this project or a dependency), imported by no GPU run: not brought
    "optuna": "the TPE searcher of `psm tune` (jobs/tune.py), not run on the GPU machine",
    "matplotlib": "the sweep's plot of `psm tune` / `psm compare` (jobs/sweep_pictures.py)",
    "virtualenv": "ray[default]'s: Ray's pip/uv runtime_env plugins import it; no run here asks "
    "for a runtime_env (5.5 MiB with its own needs)",
}
# extras of the project's requirements that no GPU run uses: `psm serve`'s (fastapi, uvicorn,
# starlette, watchfiles: ~10 MiB of wheels) is not measured there
EXTRAS_LEFT_OUT = {"ray": {"serve"}}
RAY_DROPPED = ("ray/jars/", "ray/rllib/", "ray/llm/")  # Java, RLlib, Ray LLM
XZ_PRESET = 2  # 32.3 MiB in ~21 s of one core; -6: 28.7 MiB in ~100 s (every fresh CI pays it)
LIMIT_MIB = 60  # the device tool carries 64 MiB, the working tree included
STAND_IN = "standin"  # local version label of the metadata-only wheels (machine's, left out)


def target(python: str = PYTHON) -> tuple[str, ...]:
    """pip's options for the machine's wheels, on whatever Python pip runs."""
    args = ("--python-version", python, "--implementation", "cp", "--only-binary=:all:")
    return args + tuple(a for p in PLATFORMS for a in ("--platform", p))


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(wheel_file: str) -> str:
    """The canonical project name of a wheel's file name."""
    return canonical(wheel_file.split("-")[0])


def _requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def pins() -> dict[str, str]:
    """requirements-cluster.txt: canonical name -> version."""
    pairs = (line.split("==") for line in _requirement_lines(PINS))
    return {canonical(name): version for name, version in pairs}


def device_site() -> dict[str, str]:
    """The machine's packages (device_site.txt): canonical name -> version, read off the machine
    or else this project's pin; "0" for neither (then nothing may ask for a range of it)."""
    pinned = pins()
    site = {}
    for line in _requirement_lines(DEVICE_SITE):
        name, _, version = line.partition("==")
        site[canonical(name)] = version or pinned.get(canonical(name), "0")
    return site


def not_brought() -> dict[str, str]:
    """What the bundle must not bring: the machine's packages and LEFT_OUT, name -> version."""
    pinned = pins()
    return device_site() | {name: pinned.get(name, "0") for name in LEFT_OUT}


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        (name,) = (n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(name).decode()


def roots(project_wheel: Path) -> list[str]:
    """The project's declared dependencies as a GPU run needs them: INSTEAD applied, LEFT_OUT
    left out, extras (test) left out."""
    from packaging.requirements import Requirement

    wanted = []
    for line in re.findall(r"^Requires-Dist: (.*)$", _metadata(project_wheel), re.MULTILINE):
        r = Requirement(line)
        if r.marker or canonical(r.name) in LEFT_OUT:
            continue
        kept = sorted(r.extras - EXTRAS_LEFT_OUT.get(canonical(r.name), set()))
        extras = f"[{','.join(kept)}]" if kept else ""
        first, *also = INSTEAD.get(canonical(r.name), (r.name,))
        wanted += [f"{first}{extras}{r.specifier}", *also]
    return wanted


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------


def write_stand_ins(folder: Path) -> Path:
    """A metadata-only wheel for each of `not_brought` (version `V+standin`, no requirements:
    the machine has what its own packages need), and the constraints that make pip take them and
    this project's pins for all the rest; returns the constraints file."""
    folder.mkdir(parents=True, exist_ok=True)
    absent = not_brought()
    lines = []
    for name, version in absent.items():
        _metadata_wheel(folder, name, f"{version}+{STAND_IN}")
        lines.append(f"{name}=={version}+{STAND_IN}")
    lines += [f"{name}=={version}" for name, version in pins().items() if name not in absent]
    constraints = folder / "constraints.txt"
    constraints.write_text("\n".join(lines) + "\n")
    return constraints


def _metadata_wheel(folder: Path, name: str, version: str, fields: tuple[str, ...] = ()) -> Path:
    """A wheel of metadata alone: `fields` are further METADATA lines ("Requires-Dist: ...")."""
    dist = f"{re.sub(r'[-.]+', '_', name)}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    metadata = [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}", *fields]
    wheel = "Wheel-Version: 1.0\nGenerator: psm stand-in\nRoot-Is-Purelib: true\nTag: py3-none-any"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", "\n".join(metadata) + "\n")
        z.writestr(f"{dist}.dist-info/WHEEL", wheel + "\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def build(out: Path, python: str = PYTHON) -> dict:
    """This project's wheel, then what it needs downloaded, Ray stripped, into `out` (replacing
    a previous bundle there); returns `check`'s report."""
    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    for old in out.glob("ray-*.tar.xz"):
        old.unlink()
    wheels.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="psm-bundle-") as tmp:
        _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", wheels, _source_copy(Path(tmp)))
        constraints = write_stand_ins(Path(tmp) / "site")
        download = Path(tmp) / "download"
        _pip("download", "--quiet", "--dest", download, "--find-links", Path(tmp) / "site",
             "-c", constraints, *target(python), *roots(project_wheel(out)))  # fmt: skip
        for wheel in download.glob("*.whl"):
            if f"+{STAND_IN}-" in wheel.name:
                continue
            if _name(wheel.name) == "ray":
                name = wheel.name.split("-cp")[0] + "-stripped.tar.xz"
                shutil.copyfile(stripped_ray(wheel), out / name)
            else:
                shutil.move(wheel, wheels / wheel.name)
    return check(out, python)


def _source_copy(tmp: Path) -> Path:
    """The working tree's files as git sees them (tracked, and new ones not ignored): a wheel
    built in place would take stale files from an old build/ folder, and leave one behind."""
    listing = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listing, cwd=REPO, check=True, capture_output=True, text=True)
    for name in filter(None, files.stdout.split("\0")):
        if (REPO / name).is_file():  # a tracked file deleted in the tree is not
            (tmp / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tmp / "src" / name)
    return tmp / "src"


def stripped_ray(wheel: Path) -> Path:
    """The Ray wheel as an xz tar, RAY_DROPPED and the dashboard's *.map left out, its dist-info
    first (`check` reads its METADATA without unpacking the rest). Kept in ~/.cache/psm-pose by
    the wheel's hash and these rules: xz -2 of the 155 MB takes ~20 s of one core."""
    key = hashlib.sha256(wheel.read_bytes() + repr((RAY_DROPPED, XZ_PRESET)).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "psm-pose"
    archive = cache / f"{wheel.stem}-{key.hexdigest()[:16]}.tar.xz"
    if archive.exists():
        return archive
    cache.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(f"{archive.name}.{os.getpid()}")
    with zipfile.ZipFile(wheel) as z, tarfile.open(partial, "w:xz", preset=XZ_PRESET) as tar:
        members = [m for m in z.infolist() if not m.is_dir() and _kept(m.filename)]
        members.sort(key=lambda m: ".dist-info/" not in m.filename)
        for m in members:
            info = tarfile.TarInfo(m.filename)
            info.size = m.file_size
            info.mode = (m.external_attr >> 16) & 0o777 or 0o644  # the executables stay so
            with z.open(m) as data:
                tar.addfile(info, data)
    partial.rename(archive)
    return archive


def _kept(path: str) -> bool:
    if path.startswith(RAY_DROPPED):
        return False
    return not (path.startswith("ray/dashboard/") and path.endswith(".map"))


def _pip(*args: object) -> None:
    """pip in this Python, isolated: no PIP_* variables (a PIP_FIND_LINKS adds wheels)."""
    command = [sys.executable, "-m", "pip", "--isolated", *map(str, args)]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(command)}: exit {done.returncode}\n{done.stdout[-3000:]}")


# ----------------------------------------------------------------------------------------------
# The completeness proof
# ----------------------------------------------------------------------------------------------


def project_wheel(bundle: Path) -> Path:
    found = [w for w in (bundle / "wheels").glob("*.whl") if _name(w.name) == "psm-pose"]
    if len(found) != 1:
        raise RuntimeError(f"{bundle}/wheels: {len(found)} psm-pose wheels, need one")
    return found[0]


def ray_metadata(bundle: Path) -> str:
    """The METADATA of the stripped Ray, read from its archive."""
    (archive,) = bundle.glob("ray-*.tar.xz")
    with tarfile.open(archive, "r:xz") as tar:
        for member in tar:
            if member.name.endswith(".dist-info/METADATA"):
                return tar.extractfile(member).read().decode()
    raise RuntimeError(f"{archive}: no .dist-info/METADATA")


def check(bundle: Path, python: str = PYTHON) -> dict:
    """Resolve the project's needs (`roots`) for the machine's Python on manylinux with pip,
    offline, from the bundle's wheels, the stripped Ray's own metadata and stand-ins for the
    machine's packages and LEFT_OUT. Raises if pip finds something missing, or a wheel is
    unused, or brought although not to be, or a requirement that applies on the machine's Python
    only is unmet. Returns what was resolved from where, and the bundle's sizes in MiB."""
    wanted = roots(project_wheel(bundle))
    with tempfile.TemporaryDirectory(prefix="psm-check-") as tmp:
        stand_ins = Path(tmp) / "site"
        constraints = write_stand_ins(stand_ins)
        ray = _ray_stand_in(stand_ins, ray_metadata(bundle))
        report = Path(tmp) / "report.json"
        _pip("install", "--dry-run", "--no-index", "--target", Path(tmp) / "target",
             "--find-links", bundle / "wheels", "--find-links", stand_ins, "-c", constraints,
             "--report", report, *target(python), *wanted)  # fmt: skip
        resolved = json.loads(report.read_text())["install"]
    site = device_site()
    wheels = [w.name for w in (bundle / "wheels").glob("*.whl")]
    unused = set(wheels) - {project_wheel(bundle).name}
    brought, machine, asked_left_out, unmet = {}, {}, [], []
    for item in resolved:
        name, version = canonical(item["metadata"]["name"]), item["metadata"]["version"]
        if name in site:
            machine[name] = version.removesuffix(f"+{STAND_IN}")
        elif name in LEFT_OUT:
            asked_left_out.append(name)
        else:
            brought[name] = version
            unused.discard(item["download_info"]["url"].rsplit("/", 1)[-1])
        unmet += _unmet_on_the_machine(item, resolved, python)
    problems = {
        "unused wheels": sorted(unused),
        "brought although not to be": [w for w in wheels if _name(w) in not_brought()],
        f"unmet on Python {python} only": unmet,
    }
    if any(problems.values()):
        raise RuntimeError(f"{bundle}: " + json.dumps({k: v for k, v in problems.items() if v}))
    return {
        "python": python,
        "roots": wanted,
        "ray": f"{ray.name.split('-py3')[0]}: requirements from the stripped archive's METADATA",
        "brought": dict(sorted(brought.items())),
        "from_the_machine": dict(sorted(machine.items())),
        "left_out": LEFT_OUT,
        "left_out_although_required": sorted(asked_left_out),  # by a package's metadata
        "sizes_mib": sizes(bundle),
    }


def _ray_stand_in(folder: Path, metadata: str) -> Path:
    """A metadata-only Ray wheel with the archive's name, version and Requires-Dist (extras and
    markers as written), so that pip resolves Ray's needs from its own metadata."""
    name = re.search(r"^Name: (.*)$", metadata, re.MULTILINE)[1]
    version = re.search(r"^Version: (.*)$", metadata, re.MULTILINE)[1]
    fields = re.findall(r"^(?:Requires-Dist|Provides-Extra): .*$", metadata, re.MULTILINE)
    return _metadata_wheel(folder, name, version, tuple(fields))


def _unmet_on_the_machine(item: dict, resolved: list[dict], python: str) -> list[str]:
    """pip evaluates markers for the Python it runs on, not for --python-version: the
    requirements of `item` that apply on the machine's Python but not on this one, and that the
    resolved set does not meet."""
    from packaging.requirements import Requirement

    versions = {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in resolved}
    extras = item.get("requested_extras") or [""]
    there = {"python_version": python, "python_full_version": f"{python}.3"}
    unmet = []
    for line in item["metadata"].get("requires_dist", []):
        r = Requirement(line)
        if r.marker is None:
            continue
        applies_there = any(r.marker.evaluate(there | {"extra": e}) for e in extras)
        applies_here = any(r.marker.evaluate({"extra": e}) for e in extras)
        if applies_there and not applies_here:
            have = versions.get(canonical(r.name))
            if have is None or not r.specifier.contains(have, prereleases=True):
                unmet.append(f"{item['metadata']['name']}: {line} (resolved: {have})")
    return unmet


def sizes(bundle: Path) -> dict[str, float]:
    """MiB per file (the Ray archive, each wheel) and in all."""
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    out = {str(p.relative_to(bundle)): round(p.stat().st_size / 2**20, 2) for p in files}
    out["total"] = round(sum(p.stat().st_size for p in files) / 2**20, 2)
    return out


# ----------------------------------------------------------------------------------------------
# Install (on the GPU machine: no network; the standard library and pip only)
# ----------------------------------------------------------------------------------------------


def install(bundle: Path, site: Path, pip_args: tuple[str, ...] = ()) -> None:
    """Every wheel into `site` (pip, --no-index --no-deps: `check` proved them complete), then
    the stripped Ray. `pip_args`: e.g. `target()`, to install the machine's wheels elsewhere."""
    wheels = sorted((bundle / "wheels").glob("*.whl"))
    _pip("install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--upgrade",
         "--target", site, *pip_args, *wheels)  # fmt: skip
    (archive,) = bundle.glob("ray-*.tar.xz")
    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(site, filter="data")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/device_bundle.sh", description=__doc__)
    p.add_argument("--python", default=PYTHON, help="the target's Python version (build, check)")
    sub = p.add_subparsers(dest="verb", required=True)
    for verb, what in (("build", "build into BUNDLE (PyPI), then check"), ("check", "offline")):
        sub.add_parser(verb, help=what).add_argument("bundle", type=Path)
    i = sub.add_parser("install", help="BUNDLE into SITE, offline (on the GPU machine)")
    i.add_argument("bundle", type=Path)
    i.add_argument("site", type=Path)
    args = p.parse_args(argv)
    if args.verb == "install":
        install(args.bundle, args.site)
        return 0
    report = (build if args.verb == "build" else check)(args.bundle, args.python)
    print(json.dumps(report, indent=1))
    total = report["sizes_mib"]["total"]
    print(f"{args.bundle}: complete for Python {args.python}, {total} MiB (limit {LIMIT_MIB})")
    return 0 if total <= LIMIT_MIB else 1


if __name__ == "__main__":
    sys.exit(main())
