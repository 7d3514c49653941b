"""Fail-fast configs (issue 16): a topology's or a peer config's roles, workload and their parameters are
checked before any actor starts or any socket binds: ``file:line: key: problem (did you mean ...)``, exit
code 2, no traceback, no results folder."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hivesim.cli import main
from hivesim.peer import normalize_roles
from hivesim.sim import runner

ROOT = Path(__file__).resolve().parents[1]

TOPOLOGY = """\
name: tiny
duration: 5
groups:
  nodes:
    count: 2
    roles: [averager]
  helpers:
    count: 1
    roles:
      averager: {size: 10, period: 1.0}
    dht: {bucket_size: 10}
workload:
  module: experiments.dht_lookup
  params: {interval: 0.3, ttl: 40}
"""


@pytest.fixture
def no_ray(monkeypatch):
    """A tripwire: these runs must stop before Ray (and so before any actor) starts."""

    def tripwire(*args, **kwargs):
        raise AssertionError("the run reached ray.init: validation must fail before any actor starts")

    monkeypatch.setattr(runner.ray, "init", tripwire)


def run_cli(tmp_path: Path, text: str, *overrides: str) -> tuple[int, str]:
    path = tmp_path / "topo.yaml"
    path.write_text(textwrap.dedent(text))
    results = tmp_path / "results"
    code = main(["run", str(path), *overrides, "--results-dir", str(results), "--quiet"])
    assert not results.exists(), "a failed check left a results folder"
    return code, str(path)


@pytest.mark.parametrize("mistake, expected", [
    (("roles: [averager]", "roles: [averagr]"),
     ":6: groups.nodes.roles.0: unknown role 'averagr' (did you mean 'averager'?)"),
    (("interval: 0.3", "intervall: 0.3"),
     ":14: workload.params.intervall: unknown parameter 'intervall' of workload experiments.dht_lookup "
     "(did you mean 'interval'?)"),
    (("interval: 0.3", "interval: often"),
     ":14: workload.params.interval: Input should be a valid number"),
    (("size: 10,", "sise: 10,"),
     ":10: groups.helpers.roles.averager.sise: unknown parameter 'sise' of role 'averager' (did you mean 'size'?)"),
    (("period: 1.0", "period: 1.0, ban_tme: 3"),  # a keyword AveragerRole hands on to AveragerCore
     ":10: groups.helpers.roles.averager.ban_tme: unknown parameter 'ban_tme' of role 'averager' (did you mean 'ban_time'?)"),
    (("module: experiments.dht_lookup", "module: experiments.dht_lokup"),
     ":13: workload.module: no module named 'experiments.dht_lokup' (did you mean 'experiments.dht_lookup'?)"),
    (("bucket_size: 10", "bucket_sise: 10"),
     ":11: groups.helpers.dht.bucket_sise: unknown option 'bucket_sise' of DHTNode.create (did you mean 'bucket_size'?)"),
    (("dht: {bucket_size: 10}", "dht: {bucket_size: 10}\n    endpoint: {pool_sise: 16}"),
     ":12: groups.helpers.endpoint.pool_sise: unknown option 'pool_sise' of Endpoint (did you mean 'pool_size'?)"),
    (("roles: [averager]", "roles: ['experiments.dht_lookup:ROL']"),
     ":6: groups.nodes.roles.0: experiments.dht_lookup has no 'ROL' (did you mean 'ROLE'?)"),
])
def test_a_topology_mistake_is_reported_before_any_actor_starts(tmp_path, capsys, no_ray, mistake, expected):
    old, new = mistake
    assert old in TOPOLOGY
    code, path = run_cli(tmp_path, TOPOLOGY.replace(old, new))
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{path}{expected}" in err, err
    assert "Traceback" not in err


def test_every_problem_is_reported_at_once_and_overrides_are_named(tmp_path, capsys, no_ray):
    text = TOPOLOGY.replace("roles: [averager]", "roles: [averagr]").replace("size: 10,", "sise: 10,")
    code, path = run_cli(tmp_path, text, "workload.params.intervall=2")
    err = capsys.readouterr().err
    assert code == 2
    assert f"{path}:6: groups.nodes.roles.0: unknown role 'averagr'" in err
    assert f"{path}:10: groups.helpers.roles.averager.sise" in err
    assert "command-line override workload.params.intervall: unknown parameter 'intervall'" in err


def test_the_cli_exits_2_without_a_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(TOPOLOGY.replace("roles: [averager]", "roles: [averagr]"))
    out = subprocess.run([sys.executable, "-m", "hivesim.cli", "run", str(path), "--results-dir", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert "bad.yaml:6: groups.nodes.roles.0: unknown role 'averagr' (did you mean 'averager'?)" in out.stderr
    assert "Traceback" not in out.stderr and "\x1b[" not in out.stderr
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- hivesim peer


def test_roles_may_be_a_list_of_mappings():
    assert normalize_roles(["averager", {"experiments.dht_lookup:ROLE": {"interval": 0.2}}, "dht"]) == {
        "averager": {}, "experiments.dht_lookup:ROLE": {"interval": 0.2}}
    assert normalize_roles({"averager": None}) == {"averager": {}}
    with pytest.raises(ValueError, match="named twice"):
        normalize_roles(["averager", {"averager": {}}])
    with pytest.raises(ValueError, match="a role is a name"):
        normalize_roles([5])


PEER = """\
name: volunteer
port: 0
roles:
  - experiments.dht_lookup:ROLE: {interval: 0.2, warmup: 0.2}
"""


@pytest.mark.parametrize("mistake, expected", [
    (("port: 0", "port: abc"), ":2: port: Input should be a valid integer, unable to parse string as an integer (got 'abc')"),
    (("port: 0", "prot: 0"), ":2: prot: unknown key 'prot' (did you mean 'port'?)"),
    (("experiments.dht_lookup:", "experiments.dht_lookpu:"),
     ":4: roles.0.experiments.dht_lookpu:ROLE: no module named 'experiments.dht_lookpu' (did you mean 'experiments.dht_lookup'?)"),
    (("interval: 0.2", "intervall: 0.2"),
     ":4: roles.0.experiments.dht_lookup:ROLE.intervall: unknown parameter 'intervall'"),
    (("  - experiments.dht_lookup:ROLE: {interval: 0.2, warmup: 0.2}", "  - averagr"),
     ":4: roles.0: unknown role 'averagr' (did you mean 'averager'?)"),
])
def test_a_peer_config_mistake_is_reported_before_binding(tmp_path, capsys, mistake, expected):
    old, new = mistake
    assert old in PEER
    path = tmp_path / "peer.yaml"
    path.write_text(PEER.replace(old, new))
    code = main(["peer", "--config", str(path), "--duration", "0.1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{path}{expected}" in err, err
    assert "Traceback" not in err


def test_a_peer_with_roles_as_a_list_of_mappings_starts(tmp_path, capsys):
    """The shape the README's wording invites used to crash with No module named "{'experiments"."""
    path = tmp_path / "peer.yaml"
    path.write_text(PEER)
    assert main(["peer", "--config", str(path), "--duration", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "hivesim peer volunteer is up at" in out and "leaving" in out


# ---------------------------------------------------------------- the cluster's resources


@pytest.fixture(scope="module")
def one_cpu_cluster():
    """A real local Ray with 1 CPU, standing in for a small ``ray start --head`` cluster."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


SMALL = """\
name: small
duration: 5
actor_timeout: 3
groups:
  nodes: {count: 8, num_cpus: 0.25}
workload: {module: experiments.dht_lookup}
"""


def test_a_cluster_too_small_for_the_topology_is_refused_up_front(tmp_path, capsys, one_cpu_cluster):
    """It used to wait forever at 'starting 8 peers'."""
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    code = main(["run", str(path), "--address", "auto", "--results-dir", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "the cluster cannot hold this topology's actors: it asks for 2 CPU (nodes: 8 actors x 0.25), the cluster has 1" in err
    assert not (tmp_path / "r").exists() and "Traceback" not in err

    path.write_text(SMALL.replace("num_cpus: 0.25}", "num_cpus: 0.25, resources: {gpu_box: 1}}"))
    assert main(["run", str(path), "--address", "auto", "--results-dir", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "8 gpu_box (nodes: 8 actors x 1), the cluster has 0" in err
    assert "one actor of group 'nodes' asks for 0.25 CPU, 1 gpu_box, which no single node of the cluster has" in err


def test_actors_ray_cannot_place_fail_the_run_within_actor_timeout(tmp_path, one_cpu_cluster):
    """The cluster could hold the actors but something else holds its CPU: the wait is bounded."""
    import time

    ray = one_cpu_cluster

    @ray.remote(num_cpus=1)
    class Blocker:
        def ready(self) -> bool:
            return True

    blocker = Blocker.remote()
    try:
        ray.get(blocker.ready.remote(), timeout=60)
        path = tmp_path / "small.yaml"
        path.write_text(SMALL.replace("count: 8", "count: 1"))
        started = time.monotonic()
        with pytest.raises(runner.RunFailed, match="1 of 1 peer actors did not start within 3 s"):
            runner.run(path, address="auto", results_dir=str(tmp_path / "r"), progress=False)
        assert time.monotonic() - started < 60
    finally:
        ray.kill(blocker)
