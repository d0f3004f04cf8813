"""Shared fixtures: the data folder beside the project (../shared/data, or $FEWSHOT_DATA) and one Omniglot cache."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("FEWSHOT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory) -> Path:
    """A cache folder holding the decoded Omniglot arrays (decoded once per test session, about 10 s)."""
    from fewshot.tasks.omniglot import load_omniglot

    cache_dir = tmp_path_factory.mktemp("cache")
    load_omniglot(SHARED_DATA, cache_dir)
    return cache_dir
