"""Shared test fixtures, and the machine's state beside every failure."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

# The end-to-end modules, longest first (rough seconds each takes on the 2-core CI machine; only
# the order matters): the two pytest-xdist workers (pyproject.toml: `-n 2 --dist loadfile
# --no-loadscope-reorder`) take whole modules in this order, so the long ones start at once and
# the short ones fill in at the end. Modules not named come after, in file order.
LONGEST_FIRST = {
    "test_ray_jobs.py": 400,
    "test_train.py": 300,
    "test_node_loss.py": 250,
    "test_tune.py": 150,
    "test_infer.py": 150,
    "test_autoscaling.py": 130,
    "test_gpu_run.py": 180,
    "test_eval_job.py": 60,
    "test_serve.py": 60,
    "test_device_bundle.py": 60,
    "test_compile.py": 50,
}


def pytest_collection_modifyitems(items):
    # stable: the tests of a module keep their order (their shared fixtures expect it)
    items.sort(key=lambda item: -LONGEST_FIRST.get(item.path.name, 0))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failure on CI is read later, from its output only: say whether disk, memory or stray
    Ray processes ran out or piled up when it happened."""
    report = yield
    if report.failed:
        report.sections.append(("machine at failure", _machine_state()))
    return report


def _machine_state() -> str:
    lines = []
    for where in (tempfile.gettempdir(), os.getcwd()):
        du = shutil.disk_usage(where)
        lines.append(f"disk {where}: {du.free / 2**30:.1f} GiB free of {du.total / 2**30:.0f}")
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    lines.append(f"memory available: {meminfo['MemAvailable'].strip()}")
    lines.append(f"load average: {os.getloadavg()}")
    ps = subprocess.run(["ps", "-eo", "rss=,args="], capture_output=True, text=True).stdout
    ray = [line.strip()[:120] for line in ps.splitlines() if "ray" in line.lower()]
    lines.append(f"{len(ray)} Ray processes (RSS KiB, command):")
    return "\n".join(lines + ray[:40])


# what `_one_cpu_thread` does here, for every process a test starts (a benchmark, a job's driver,
# a CLI run): on 2 cores shared with the other test process, OpenMP's two spinning threads made
# a step of the GPU script's CPU dry run 17x slower (6.4 s against 0.37 s at batch 2)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_cpu_thread():
    """The test models are tiny, so intra-op threads buy little; and on 2 cores shared with Ray
    workers, spinning OpenMP threads made model tests ~15x slower (8 min instead of 30 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def coco_root() -> Path:
    """Real COCO samples in ../shared/data/coco (its SOURCES.md); absent on users' machines."""
    # resolved: ../shared may be a link, and records carry resolved image paths
    root = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco").resolve()
    if not root.is_dir():
        pytest.skip(f"real COCO samples not found at {root}")
    return root


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (2 CPUs, like the CI machine).

    With the dashboard: Ray Train's PlacementGroupCleaner asks the State API whether a finished
    trainer's controller is gone; without it the placement group of a Tune trial's trainer is
    never freed and the next trial waits for its workers forever. The cleaner finds the State
    API by looking for Ray instances on the machine unless RAY_API_SERVER_ADDRESS names it, and
    with two (the other test worker's, a `ray start` cluster of tests/local_cluster.py) its
    thread dies on "Found multiple active Ray instances": so it is named, before the raylet
    starts, for every process of this instance to inherit.
    """
    ray = pytest.importorskip("ray")
    from ray.data import DataContext

    from benchmarks.train_start import LEAN_ENV
    from tests.local_cluster import QUIET_RAY_ENV, free_port

    # Ray Train's costs that test nothing of ours, set before any trainer (drivers pass them on),
    # and an idle Ray's, set before its processes start
    for key, value in (LEAN_ENV | QUIET_RAY_ENV).items():
        os.environ.setdefault(key, value)
    # MLflow's system-metrics monitor publishes a sample only once a whole interval (10 s by
    # default) has passed: the tests' training runs may be shorter, so every second
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    if not ray.is_initialized():
        dashboard = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
        ray.init(num_cpus=2, log_to_driver=False, dashboard_port=dashboard)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic COCO root shared by the data tests (written once per session)."""
    from pipelines.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, train_images=12, val_images=4, seed=3)
    return root
