"""``--address`` against a real Ray cluster: ``ray start --head`` on local ports, a small sweep through the CLI with
``--address``, then the cluster is stopped (by the process ids this test started, never with ``ray stop``, which
would also end other Ray sessions on a shared machine).

What it guards: the driver joins an existing cluster instead of starting Ray, the trials run in that cluster's
workers (which get PYTHONPATH and the cache location from the job's runtime environment, rlhf_ablate/launch/tune.py:
``_init_ray``), they share one stage cache (docs/slurm.md: the run directory and the cache must be on a file system
every node sees), and the results are the same layout as a local sweep.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from rlhf_ablate.run.cache import read_executions

# One xdist group for the tests that start Ray or use the Slurm cluster: they run one after another on one worker
# while the other worker runs the rest (README: `pytest -n 2 --dist loadgroup`).
pytestmark = pytest.mark.xdist_group("cluster")

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model.quantization": "none", "sft.max_steps": 2, "rm.max_steps": 2, "sft.batch_size": 8,
        "rm.batch_size": 8, "ppo.total_episodes": 8, "ppo.rollout_batch_size": 4, "ppo.mini_batch_size": 4,
        "ppo.max_new_tokens": 8, "eval.max_new_tokens": 8, "data.max_sft": 16, "data.max_rm_groups": 8,
        "data.max_ppo_prompts": 8, "data.max_eval": 4}
START_TIMEOUT_S = 120


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ray_executable() -> str:
    here = Path(sys.executable).with_name("ray")
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        pytest.skip("the `ray` command is not installed next to this Python")
    return found


def _cluster_processes(leader: "psutil.Process", temp: Path) -> list:  # noqa: F821 - psutil imported lazily
    """The processes of our cluster: the `ray start` process, its descendants, and any process whose command line
    names our private temp dir (Ray daemons that left the process tree)."""
    import psutil

    procs = {}
    try:
        procs[leader.pid] = leader
        procs.update({p.pid: p for p in leader.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(str(temp) in part for part in (p.info["cmdline"] or [])):
            procs[p.pid] = p
    return list(procs.values())


@pytest.fixture
def ray_head(tmp_path):
    import psutil

    # Ray's unix sockets live under its temp dir, and AF_UNIX paths are short: a short private dir under /tmp.
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    gcs, agent = _free_ports(2)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    log = open(tmp_path / "ray_head.log", "w")
    head = subprocess.Popen([_ray_executable(), "start", "--head", "--block", f"--port={gcs}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
                             "--include-dashboard=false", f"--dashboard-agent-listen-port={agent}",
                             f"--temp-dir={temp}",
                             "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    leader = psutil.Process(head.pid)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the head is up when its GCS port accepts connections
            if head.poll() is not None:
                pytest.fail(f"`ray start --head` exited with {head.returncode}:\n"
                            + (tmp_path / "ray_head.log").read_text()[-3000:])
            try:
                socket.create_connection(("127.0.0.1", gcs), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the Ray head did not open port {gcs} within {START_TIMEOUT_S} s:\n"
                                + (tmp_path / "ray_head.log").read_text()[-3000:])
                time.sleep(0.5)
        yield f"127.0.0.1:{gcs}", temp
    finally:
        procs = _cluster_processes(leader, temp)
        for p in procs:  # by process id: only what this test started
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        gone, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=30)
        head.wait(timeout=30)
        log.close()
        left = [p.pid for p in _cluster_processes(leader, temp) if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes of the test's Ray cluster still running: {left}"


@pytest.mark.slow
def test_sweep_with_address_runs_in_an_existing_cluster(tmp_path, ray_head):
    address, temp = ray_head
    sweep = tmp_path / "cluster.yaml"
    sweep.write_text(yaml.safe_dump({"name": "cluster", "base": TINY, "axes": {"ppo.kl_coef": [0.05, 0.5]},
                                     "seeds": [0], "tracking": {"wandb": "disabled"},
                                     "cache_dir": str(tmp_path / "cache")}))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("RAY_ADDRESS", None)
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "rlhf_ablate", "sweep", str(sweep), "--address", address,
                           "--out", str(run_dir), "--no-report"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted((run_dir / "trials").glob("*/result.json"))]
    assert len(results) == 2 and all(r["status"] == "ok" for r in results), [r["error"] for r in results]
    assert sorted(r["axes"]["ppo.kl_coef"] for r in results) == [0.05, 0.5]
    # One shared stage cache: SFT and RM built once for both kl_coef values.
    built = [e["stage"] for e in read_executions(tmp_path / "cache") if e["status"] == "ok"]
    assert built.count("sft") == 1 and built.count("rm") == 1 and built.count("ppo") == 2, built
    # The trials ran in the cluster's workers: their processes logged under the cluster's temp dir, and none of
    # them was the driver's own (a local Ray would have its own session under the default temp dir).
    worker_logs = list(temp.glob("session_*/logs/python-core-worker-*.log"))
    assert worker_logs, sorted(p.name for p in temp.glob("session_*/logs/*"))[:20]
    pids = {json.loads(line)["pid"] for r in results
            for line in (run_dir / "trials" / r["trial_id"] / "attempts.jsonl").read_text().splitlines()}
    assert any(str(pid) in p.name for pid in pids for p in worker_logs), (pids, [p.name for p in worker_logs])
