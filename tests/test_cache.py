"""Stage cache: keys, hits, atomicity on failure and SIGKILL, locking between processes, --no-cache."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_ablate.run import cache as cache_mod
from rlhf_ablate.run.cache import COMPLETE, StageCache, code_version, read_executions
from rlhf_ablate.rundir import default_cache_root


def _writer(text: str):
    def build(d: Path) -> None:
        (d / "model.txt").write_text(text)
    return build


def test_key_is_canonical_and_sensitive(tmp_path):
    c = StageCache(tmp_path)
    k1 = c.key("sft", {"lr": 0.1, "rank": 8, "data": "abc"})
    assert k1 == c.key("sft", {"data": "abc", "rank": 8, "lr": 0.1})  # key order does not matter
    assert k1 != c.key("sft", {"lr": 0.2, "rank": 8, "data": "abc"})
    assert k1 != c.key("rm", {"lr": 0.1, "rank": 8, "data": "abc"})  # the stage name is part of the key
    assert len(k1) == 32 and all(ch in "0123456789abcdef" for ch in k1)


def test_code_version_ignores_orchestration_files(tmp_path):
    pkg = tmp_path / "rlhf_ablate"
    shutil.copytree(cache_mod.PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__", "ko_sample"))
    # Every exclusion names code that exists: a move must not silently turn an exclusion off.
    for entry in cache_mod.ORCHESTRATION:
        assert (pkg / entry).exists(), entry
    v0 = code_version(pkg)
    cache_mod._code_version.cache_clear()
    for rel in ("launch/tune.py", "launch/slurm.py", "cli.py", "config/sweep.py", "run/tracking.py"):
        (pkg / rel).write_text((pkg / rel).read_text() + "\n# orchestration edit\n")
    assert code_version(pkg) == v0
    cache_mod._code_version.cache_clear()
    (pkg / "ppo" / "math.py").write_text((pkg / "ppo" / "math.py").read_text() + "\n# a stage edit\n")
    assert code_version(pkg) != v0
    cache_mod._code_version.cache_clear()


def test_code_version_pin(monkeypatch, tmp_path):
    c = StageCache(tmp_path)
    k = c.key("sft", {"a": 1})
    monkeypatch.setenv("RLHF_ABLATE_CODE_VERSION", "pinned-1")
    assert c.key("sft", {"a": 1}) != k


def test_miss_then_hit(tmp_path):
    c = StageCache(tmp_path / "cache")
    calls = []

    def build(d: Path) -> None:
        calls.append(d)
        assert d.name.startswith(".tmp-") and d.is_dir() and not any(d.iterdir())
        (d / "w.txt").write_text("weights")
        time.sleep(0.05)

    key = c.key("sft", {"x": 1})
    r1 = c.run("sft", key, build)
    assert not r1.hit and r1.seconds >= 0.05
    assert r1.path == tmp_path / "cache" / "sft" / key
    assert (r1.path / "w.txt").read_text() == "weights" and (r1.path / COMPLETE).is_file()
    r2 = c.run("sft", key, build)
    assert r2.hit and r2.seconds == 0.0 and r2.path == r1.path
    assert len(calls) == 1
    ex = read_executions(tmp_path / "cache")
    assert [(e["stage"], e["key"], e["status"]) for e in ex] == [("sft", key, "ok")]
    assert r2.timing()["cache_hit"] is True
    assert not list((tmp_path / "cache" / "sft").glob(".tmp-*"))


def test_failed_build_leaves_nothing_and_reraises(tmp_path):
    c = StageCache(tmp_path)
    key = c.key("rm", {"x": 1})

    def bad(d: Path) -> None:
        (d / "half.bin").write_text("half")
        raise FloatingPointError("NaN loss at step 3")

    with pytest.raises(FloatingPointError, match="NaN loss"):
        c.run("rm", key, bad)
    assert not (tmp_path / "rm" / key).exists()
    assert not list((tmp_path / "rm").glob(".tmp-*"))
    assert read_executions(tmp_path)[-1]["status"] == "failed"
    r = c.run("rm", key, _writer("ok"))  # the next attempt builds normally
    assert not r.hit and (r.path / "model.txt").read_text() == "ok"


def test_disabled_never_reads_and_is_private(tmp_path):
    on = StageCache(tmp_path)
    key = on.key("sft", {"x": 1})
    on.run("sft", key, _writer("cached"))
    off = StageCache(tmp_path, enabled=False)
    a = off.run("sft", key, _writer("fresh-a"))
    b = off.run("sft", key, _writer("fresh-b"))
    assert not a.hit and not b.hit and a.path != b.path
    assert (a.path / "model.txt").read_text() == "fresh-a" and (b.path / "model.txt").read_text() == "fresh-b"
    assert (a.path / COMPLETE).is_file()
    assert (on.path("sft", key) / "model.txt").read_text() == "cached"  # untouched
    assert [e["cached"] for e in read_executions(tmp_path)] == [True, False, False]


def test_default_cache_root(monkeypatch, tmp_path):
    class Spec:
        cache_dir = None

    monkeypatch.setenv("RLHF_ABLATE_CACHE", str(tmp_path / "env"))
    assert default_cache_root(Spec()) == (tmp_path / "env" / "stages").resolve()
    Spec.cache_dir = str(tmp_path / "explicit")
    assert default_cache_root(Spec()) == (tmp_path / "explicit").resolve()
    monkeypatch.delenv("RLHF_ABLATE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_root(None) == (tmp_path / "home" / ".cache" / "rlhf_ablate" / "stages").resolve()


def _slow_build_proc(root: str, key: str, out: str) -> None:
    c = StageCache(root)

    def build(d: Path) -> None:
        time.sleep(0.6)
        (d / "model.txt").write_text(str(os.getpid()))

    r = c.run("sft", key, build)
    Path(out).write_text(json.dumps({"hit": r.hit, "waited": r.waited, "path": str(r.path)}))


def test_concurrent_processes_build_once(tmp_path):
    key = StageCache(tmp_path).key("sft", {"x": "shared"})
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_slow_build_proc, args=(str(tmp_path), key, str(tmp_path / f"out{i}.json")))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    outs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(3)]
    assert sorted(o["hit"] for o in outs) == [False, True, True]
    assert len({o["path"] for o in outs}) == 1
    assert len([e for e in read_executions(tmp_path) if e["status"] == "ok"]) == 1


_KILL_SCRIPT = r"""
import sys, time
from pathlib import Path
from rlhf_ablate.run.cache import StageCache
c = StageCache(sys.argv[1])
def build(d):
    (d / "half.bin").write_text("half written")
    Path(sys.argv[3]).write_text("started")
    time.sleep(60)
c.run("ppo", sys.argv[2], build)
"""


def test_sigkill_mid_build_leaves_no_visible_artifact(tmp_path):
    c = StageCache(tmp_path / "c")
    key = c.key("ppo", {"kl": 0.1})
    flag = tmp_path / "started"
    p = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path / "c"), key, str(flag)],
                         cwd=Path(cache_mod.__file__).parents[1])
    try:
        deadline = time.time() + 30
        while not flag.exists():
            assert time.time() < deadline and p.poll() is None, "builder did not start"
            time.sleep(0.05)
        # The holder is written into the lock file for diagnostics.
        assert str(p.pid) in (tmp_path / "c" / "ppo" / f"{key}.lock").read_text()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not c.path("ppo", key).exists()
    assert len(list((tmp_path / "c" / "ppo").glob(".tmp-*"))) == 1  # the stale leftover
    t0 = time.monotonic()
    r = c.run("ppo", key, _writer("full"))  # the dead holder's flock is gone: no wait
    assert time.monotonic() - t0 < 5
    assert not r.hit and (r.path / "model.txt").read_text() == "full" and not (r.path / "half.bin").exists()
    assert not list((tmp_path / "c" / "ppo").glob(".tmp-*"))  # cleaned


def test_rejects_bad_names(tmp_path):
    c = StageCache(tmp_path)
    with pytest.raises(ValueError):
        c.run("sft", "../escape", _writer("x"))
    with pytest.raises(ValueError):
        c.run(".hidden", "k", _writer("x"))


def test_file_lock_is_exclusive_across_processes_and_names_its_holder(tmp_path):
    """rlhf_ablate.files.file_lock, the one inter-process lock (stage cache, sweep driver, built-in build): a second
    process cannot take it, is told who holds it, and takes it at once when the holder dies."""
    from rlhf_ablate.files import LockBusy, file_lock

    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from rlhf_ablate.files import file_lock\n"
        "with file_lock(sys.argv[1]):\n"
        "    Path(sys.argv[2]).write_text('held'); time.sleep(60)\n"), str(lock), str(tmp_path / "held")],
        cwd=Path(cache_mod.__file__).parents[2])
    try:
        deadline = time.time() + 30
        while not (tmp_path / "held").exists():
            assert time.time() < deadline and holder.poll() is None, "the holder did not take the lock"
            time.sleep(0.05)
        with pytest.raises(LockBusy) as busy:
            with file_lock(lock, timeout=0):
                pass
        assert f"pid={holder.pid}" in busy.value.holder
    finally:
        holder.kill()
        holder.wait()
    with file_lock(lock, timeout=5):  # the kernel dropped the dead holder's lock
        assert f"pid={os.getpid()}" in lock.read_text()


def test_build_ended_from_outside_is_logged_as_interrupted(tmp_path):
    c = StageCache(tmp_path)
    key = c.key("ppo", {"x": 1})

    def stopped(d: Path) -> None:
        raise SystemExit(0)  # what Ray raises in the trial thread of a trial its scheduler stopped

    with pytest.raises(SystemExit):
        c.run("ppo", key, stopped)
    assert read_executions(tmp_path)[-1]["status"] == "interrupted"
    assert not c.path("ppo", key).exists()
