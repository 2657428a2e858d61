"""Shared test fixtures."""

from pathlib import Path

import pytest


@pytest.fixture
def coco_root() -> Path:
    """Real COCO samples in ../shared/data/coco (its SOURCES.md); absent on users' machines."""
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco"
    if not root.is_dir():
        pytest.skip(f"real COCO samples not found at {root}")
    return root
