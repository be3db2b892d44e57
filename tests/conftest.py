"""Shared fixtures: where the real question sets live, and a temporary cache root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PROBEKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real question sets in their original formats (../shared/data)."""
    if not (SHARED_DATA / "arc" / "arc_all_splits.jsonl").exists():
        pytest.skip(f"real question sets not found at {SHARED_DATA} (set PROBEKIT_SHARED_DATA)")
    return SHARED_DATA
