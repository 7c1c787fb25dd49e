"""Shared fixtures: the real data folder, a tiny synthetic cohort, one torch thread per process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_shared_data() -> Path | None:
    """``SAP_SHARED_DATA``, else ``../shared/data``, else ``./shared/data`` (relative to the repo)."""
    candidates = []
    if os.environ.get("SAP_SHARED_DATA"):
        candidates.append(Path(os.environ["SAP_SHARED_DATA"]))
    candidates += [REPO_ROOT.parent / "shared" / "data", REPO_ROOT / "shared" / "data"]
    return next((c for c in candidates if (c / "README.md").is_file()), None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real CT/MR test volumes; skips without them, fails instead when ``CI=true``."""
    found = find_shared_data()
    if found is None:
        message = "real data not found (set SAP_SHARED_DATA or place shared/data beside the repo)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """CI has two cores; one thread per process keeps parallel tests from oversubscribing."""
    try:
        import torch
    except ImportError:  # sap.metrics tests run without torch
        return
    torch.set_num_threads(1)
