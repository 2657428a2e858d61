"""Shared test fixtures."""

from pathlib import Path

import pytest
import torch


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
    never freed and the next trial waits for its workers forever.
    """
    ray = pytest.importorskip("ray")
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=False)
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
