"""A real multi-node Ray cluster on this machine: ``hivesim run --address`` places groups by their custom
resources, peers on both nodes find each other's DHT values, and the results come back.

Two Ray nodes (head ``{"region_a": 4}``, worker ``{"region_b": 4}``) are started by a helper process
(this file run as a script) with ``ray.cluster_utils.Cluster``, everything pinned to 127.0.0.1:

* ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray's own node address 127.0.0.1 (on Linux Ray otherwise
  replaces 127.0.0.1 by the machine's routable address); ``ray start --address`` refuses that setting,
  hence ``Cluster`` and not two ``ray start`` commands. The peers then listen on 127.0.0.1 too (PeerHost
  binds the node's address when it is a loopback one).
* ``RAY_TMPDIR`` is a fresh folder, so the cluster's address file is not ``/tmp/ray/ray_current_cluster``:
  another ``ray.init()`` on this machine (a local ``hivesim run``) must not find and join this cluster.
* Token authentication (Ray >= 2.60): the nodes and the client get ``RAY_AUTH_MODE=token`` and a token of
  this test's own (``RAY_AUTH_TOKEN``), so nothing depends on, or touches, ``~/.ray/auth_token``. A client
  that is given the address but not the token is refused, with a message that says what to set.

The helper owns the nodes: the test closes its stdin (it then calls ``Cluster.shutdown()``), and kills
its process group if it is still there after 30 s; ``ray stop`` is never used (it would stop every Ray on
the machine). The nodes' reaper processes also take them down should the helper die.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TOPOLOGY = """\
name: cluster
seed: 3
duration: 40
groups:
  a: {count: 4, peers_per_actor: 2, resources: {region_a: 1}}
  b: {count: 4, peers_per_actor: 2, resources: {region_b: 1}}
workload:
  module: tests.cluster_workload
  params: {interval: 0.3}
collect_every: 1.0
actor_timeout: 60
bootstrap_timeout: 60
"""


def _cluster_env(tmp: str, token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_TMPDIR=tmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes pinned to 127.0.0.1: ``{"address", "nodes": {node_id: resources}, "env"}``."""
    tmp = tempfile.mkdtemp(prefix="hsray", dir="/tmp")  # short: Ray's socket paths live under it
    (Path(tmp) / "ray").mkdir()  # Ray's temp dir ($RAY_TMPDIR/ray)
    env = _cluster_env(tmp, secrets.token_hex(32))
    keeper = subprocess.Popen([sys.executable, __file__, "keep", tmp], env=env, cwd=ROOT, start_new_session=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(Path(tmp) / "keeper.log", "w"),
                              text=True)
    try:
        line = keeper.stdout.readline()  # the keeper prints one line once both nodes are up (or dies)
        if not line:
            keeper.wait(10)
            pytest.fail(f"the cluster did not start: {(Path(tmp) / 'keeper.log').read_text()[-3000:]}")
        yield {**json.loads(line), "env": env}
    finally:
        try:
            keeper.stdin.close()  # the keeper shuts its cluster down and exits
            keeper.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(keeper.pid, signal.SIGKILL)
            keeper.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def _hivesim_run(topology: Path, address: str, env: dict[str, str], results: Path, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "hivesim.cli", "run", str(topology), "--address", address,
                           "--results-dir", str(results), "--quiet"],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_groups_are_placed_by_resources_and_peers_on_both_nodes_talk(cluster, tmp_path):
    nodes = cluster["nodes"]
    by_resource = {r: n for n, res in nodes.items() for r in res if r.startswith("region_")}
    assert set(by_resource) == {"region_a", "region_b"} and by_resource["region_a"] != by_resource["region_b"]
    assert cluster["address"].startswith("127.0.0.1:") and all(ip == "127.0.0.1" for ip in cluster["ips"].values())

    topology = tmp_path / "cluster.yaml"
    topology.write_text(TOPOLOGY)
    t0 = time.monotonic()
    out = _hivesim_run(topology, cluster["address"], cluster["env"], tmp_path / "results")
    assert out.returncode == 0, out.stderr[-4000:]
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "results"
    for name in ("config.yaml", "samples.jsonl", "summary.json", "peers.jsonl"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["error"] is None and summary["peers"] == 8
    assert summary["finished_early_s"] is not None, "not every peer found every other peer's record within 40 s"

    # placement: each group's actors ran on the node that has its resource, recorded by the actors themselves
    assert summary["placement"] == {"a": {by_resource["region_a"]: 2}, "b": {by_resource["region_b"]: 2}}
    samples = _read(run_dir / "samples.jsonl")
    placed = {s["peer"]: s for s in samples if s["name"] == "placed"}
    assert set(placed) == {f"{g}.{i}" for g in "ab" for i in range(4)}
    for peer, s in placed.items():
        assert s["node"] == by_resource["region_a" if peer.startswith("a.") else "region_b"], s
        assert s["address"].startswith("tcp://127.0.0.1:"), s  # hivesim's addresses pinned to loopback too

    # talk: every peer read every other peer's record through the DHT, 16 of them across nodes each way
    probes = [s for s in samples if s["name"] == "probe"]
    pairs = {(s["peer"], s["owner"]) for s in probes}
    assert len(pairs) == 8 * 7
    cross = [s for s in probes if s["node"] != s["owner_node"]]
    assert len({(s["peer"], s["owner"]) for s in cross}) == 2 * 4 * 4
    assert all(s["owner_node"] == placed[s["owner"]]["node"] for s in probes)
    assert summary["workload"]["cross_node_found"] == len(cross) and len(summary["workload"]["nodes"]) == 2
    assert time.monotonic() - t0 < 90


def test_a_client_without_the_clusters_token_is_told_what_to_set(cluster, tmp_path):
    topology = tmp_path / "cluster.yaml"
    topology.write_text(TOPOLOGY)
    env = {k: v for k, v in cluster["env"].items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"] = "token", secrets.token_hex(32)  # a wrong token
    out = _hivesim_run(topology, cluster["address"], env, tmp_path / "results", timeout=90)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "RAY_AUTH_MODE=token" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "results").exists()


def _keep(tmp: str) -> None:
    """Start the two nodes, print where they are, hold them until stdin closes (or SIGTERM), then stop them."""
    import ray
    from ray.cluster_utils import Cluster

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    common = dict(node_ip_address="127.0.0.1", num_cpus=1, include_dashboard=False, temp_dir=f"{tmp}/ray")
    cluster = Cluster()
    try:
        cluster.add_node(**common, resources={"region_a": 4})  # the head
        cluster.add_node(**common, resources={"region_b": 4})
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        alive = [n for n in ray.nodes() if n["Alive"]]
        nodes = {n["NodeID"]: {k: v for k, v in n["Resources"].items() if k.startswith("region_")} for n in alive}
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in alive}
        ray.shutdown()
        print(json.dumps({"address": cluster.address, "nodes": nodes, "ips": ips}), flush=True)
        sys.stdin.read()  # until the test closes it
    finally:
        cluster.shutdown()


if __name__ == "__main__" and sys.argv[1:2] == ["keep"]:
    _keep(sys.argv[2])
