"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """Point $RLHF_ABLATE_CACHE at one session temp dir, so the built-in tiny models (whose build pretrains them for
    ~20 s on 2 idle cores, minutes on busy ones) are built once per test session, never in the user's home cache.
    Restored at the end of the session."""
    d = tmp_path_factory.mktemp("rlhf_ablate_cache")
    old = os.environ.get("RLHF_ABLATE_CACHE")
    os.environ["RLHF_ABLATE_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("RLHF_ABLATE_CACHE", None)
    else:
        os.environ["RLHF_ABLATE_CACHE"] = old
