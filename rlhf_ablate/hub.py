"""Reaching the Hugging Face hub, or knowing quickly that we cannot: one probe for model resolution
(rlhf_ablate/models/loading.py) and Hub dataset sources (rlhf_ablate/data/sources.py).

Without it, a hub id on a machine without network costs about 25 s of huggingface_hub retries (five, with backoff)
for every config, tokenizer and weights request, with a dozen lines of retry noise; `sweep --dry-run` of a two-value
axis took 35-48 s before it printed '?' (issue 11). So before any hub request we ask once per process whether the
endpoint (or the HTTPS proxy) accepts a TCP connection within ``PROBE_TIMEOUT`` seconds. DNS lookups have no timeout
of their own, so the probe runs in a daemon thread that we stop waiting for. When the hub cannot be reached, or
``HF_HUB_OFFLINE`` is set, callers use the local caches only and say so.

The bottom layer: standard library only at import time (huggingface_hub is imported inside the functions).
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Optional

PROBE_TIMEOUT = 3.0  # seconds: a working hub answers a TCP connect in well under one


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    """True when the user asked for the local caches only (HF_HUB_OFFLINE, or the datasets/transformers spellings)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or any(_truthy(v) for v in (
        "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _target() -> tuple[str, int]:
    """Host and port a request to the hub connects to first: the HTTPS proxy when one is set, else the endpoint."""
    url = urllib.parse.urlsplit(endpoint())
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy and url.scheme == "https":
        p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        return p.hostname or "", p.port or 80
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


@functools.lru_cache(maxsize=8)
def _probe(host: str, port: int, timeout: float) -> Optional[str]:
    found: list[Optional[str]] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                found.append(None)
        except OSError as e:
            found.append(f"{type(e).__name__}: {e}".strip())

    t = threading.Thread(target=connect, daemon=True, name="rlhf-ablate-hub-probe")
    t.start()
    t.join(timeout + 0.5)
    return found[0] if found else f"no answer within {timeout:g} s"


def unreachable(timeout: float = PROBE_TIMEOUT) -> Optional[str]:
    """None when the hub can be reached; otherwise why not (offline mode, or the failed connection).

    Asked once per process and remembered, so a sweep with many model configs pays for one probe at most."""
    if offline():
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    host, port = _target()
    if not host:
        return f"the hub endpoint {endpoint()!r} has no host name"
    reason = _probe(host, port, timeout)
    return None if reason is None else f"{endpoint()} could not be reached ({reason})"


def cached_model_dir(repo_id: str, revision: Optional[str] = None) -> Optional[str]:
    """The local snapshot directory of a hub model that is in the Hugging Face cache (its config.json is), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision or None, repo_type="model")
    except Exception:  # noqa: BLE001 - an invalid id or revision is simply not cached
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


def cached_dataset_dirs(repo_id: str) -> list[Path]:
    """Prepared copies of a Hub dataset in the `datasets` cache (what `load_dataset` reuses offline): the
    ``<ns>___<name>/<config>/<version>/<hash>`` directories of ``HF_DATASETS_CACHE``."""
    import datasets.config
    from datasets.naming import camelcase_to_snakecase

    parts = repo_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = Path(os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE))) / "___".join(parts)
    return sorted(p for p in root.glob("*/*/*") if p.is_dir())


@contextlib.contextmanager
def cache_only():
    """Within the block, huggingface_hub and datasets use their local caches only, as with HF_HUB_OFFLINE=1 (both
    read the flag from their module constants at call time, not only at import)."""
    import sys

    from huggingface_hub import constants

    mods = [constants] + [m for m in (sys.modules.get("datasets.config"),) if m is not None]
    old = [m.HF_HUB_OFFLINE for m in mods]
    for m in mods:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, v in zip(mods, old):
            m.HF_HUB_OFFLINE = v
