"""The same Peer code on Ray actors and under plain asyncio, and link shaping measured on real actors."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import ray

from hivesim.net.identity import Identity
from hivesim.sim.actor import PeerHost
from hivesim.sim.network import link_params
from hivesim.sim.topology import Topology

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


def topology(**network):
    return Topology.model_validate({
        "name": "t", "duration": 10, "workload": {"module": "experiments.dht_lookup"},
        "groups": {"near": {"count": 2, "region": "a"}, "far": {"count": 1, "region": "b"}},
        "network": network,
    })


def test_configured_latencies_show_in_measured_rpc_times(local_ray):
    topo = topology(latency={"regions": {"a": {"a": 0.01, "b": 0.06}, "b": {"b": 0.0}}})
    latency, params, _ = link_params(topo, 0)
    Host = ray.remote(PeerHost)
    hosts = {name: Host.options(num_cpus=0.5).remote(latency) for name in topo.peer_names()}
    addresses = {}
    try:
        for name, host in hosts.items():
            spec = {"links": params[name], "identity": Identity().private_bytes()}
            addresses[name] = ray.get(host.start_peer.remote(name, spec, list(addresses.values())[:1]))
        near = ray.get(hosts["near.0"].measure_rtt.remote("near.0", addresses["near.1"], 5))
        far = ray.get(hosts["near.0"].measure_rtt.remote("near.0", addresses["far.0"], 5))
        assert 0.020 <= min(near) and max(near) < 0.06, near  # 2 x 10 ms
        assert 0.120 <= min(far) and max(far) < 0.2, far  # 2 x 60 ms, the same number both ways
        back = ray.get(hosts["far.0"].measure_rtt.remote("far.0", addresses["near.0"], 3))
        assert 0.120 <= min(back) < 0.2
    finally:
        for host in hosts.values():
            ray.kill(host)


PEER_CONFIG = """\
name: volunteer
roles:
  experiments.dht_lookup:ROLE: {interval: 0.2, warmup: 0.2}
"""


def test_a_plain_asyncio_peer_joins_a_swarm_of_ray_actors(local_ray, tmp_path):
    Host = ray.remote(PeerHost)
    hosts = [Host.options(num_cpus=0.5).remote(None) for _ in range(2)]
    config = tmp_path / "peer.yaml"
    config.write_text(PEER_CONFIG)
    volunteer = None
    try:
        first = ray.get(hosts[0].start_peer.remote("ray.0", {}, []))
        ray.get(hosts[1].start_peer.remote("ray.1", {}, [first]))
        for i, host in enumerate(hosts):
            ray.get(host.add_role.remote(f"ray.{i}", "experiments.dht_lookup:ROLE", {"interval": 0.2, "warmup": 0.2}))
        volunteer = subprocess.Popen(
            [sys.executable, "-m", "hivesim.cli", "peer", "--config", str(config), "--initial-peers", first, "--duration", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        line = volunteer.stdout.readline()
        assert "hivesim peer volunteer is up at tcp://" in line, line + volunteer.stderr.read(2000) if volunteer.poll() is not None else line
        deadline = time.time() + 30
        directory = None
        while time.time() < deadline:
            directory = ray.get(hosts[1].dht_get.remote("ray.1", "directory", True))
            if directory and "volunteer" in directory:
                break
            time.sleep(0.5)
        assert directory and {"ray.0", "ray.1", "volunteer"} <= set(directory)
        value = ray.get(hosts[1].dht_get.remote("ray.1", "key.volunteer.0"))
        assert value == {"owner": "volunteer", "j": 0}  # stored by the asyncio peer, read on a Ray actor
        time.sleep(1.0)
        samples = [s for item in ray.get(hosts[0].drain.remote()) for s in item["samples"] if s["name"] == "lookup"]
        assert samples and all(s["ok"] for s in samples)
    finally:
        if volunteer is not None:
            volunteer.terminate()
            try:
                volunteer.wait(15)
            except subprocess.TimeoutExpired:
                volunteer.kill()
        for host in hosts:
            ray.kill(host)
    assert volunteer.returncode == 0  # it left politely on SIGTERM
