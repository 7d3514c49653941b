"""Topology files: what a simulated (or cluster) run consists of, validated with clear errors.

A topology is YAML, read with OmegaConf (so ``key=value`` overrides from the command line work and
``${...}`` interpolation is available) and checked against the pydantic models below. A mistake is
reported as ``file:line: key.path: what is wrong`` — with a suggestion for a misspelt key — instead of
a traceback. Every key is documented in docs/simulation.md.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator


class TopologyError(ValueError):
    """A topology file (or override) that cannot be run; the message names the key and the line."""


_UNITS = {
    "b/s": 1 / 8, "bit/s": 1 / 8, "kbit/s": 1e3 / 8, "mbit/s": 1e6 / 8, "gbit/s": 1e9 / 8,
    "bps": 1 / 8, "kbps": 1e3 / 8, "mbps": 1e6 / 8, "gbps": 1e9 / 8,
    "b": 1, "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9, "kib/s": 1024, "mib/s": 1 << 20, "gib/s": 1 << 30,
}


def parse_rate(value: Any) -> float | None:
    """Bandwidth in bytes/s: a number, or a string like ``"100Mbit/s"``, ``"10MB/s"``, ``"1GiB/s"``."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        if value is not None and value <= 0:
            raise ValueError("bandwidth must be positive (bytes/s) or null for unlimited")
        return None if value is None else float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z/]+)\s*", value)
        if match and match.group(2).lower() in _UNITS:
            rate = float(match.group(1)) * _UNITS[match.group(2).lower()]
            if rate > 0:
                return rate
    raise ValueError(f"not a bandwidth: {value!r} (use bytes/s, or e.g. '100Mbit/s', '10MB/s')")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _roles_shape(value: Any) -> Any:
    """``roles: [averager, trainer]``, ``roles: {averager: {size: 10}}`` or ``roles: [{averager: {size: 10}}, trainer]``;
    one clear message for anything else (pydantic would report each shape of the union separately)."""
    if value is None:
        return []
    shape = "roles is a list of role names (and {name: {params}} items) or a mapping {name: {params}}"
    if isinstance(value, dict):
        items = [(None, value)]
    elif isinstance(value, list):
        items = [(i, item) for i, item in enumerate(value)]
    else:
        raise ValueError(f"{shape}, got {value!r}")
    for i, item in items:
        where = "" if i is None else f"item {i}: "
        if isinstance(item, str) and i is not None:
            continue
        if not isinstance(item, dict):
            raise ValueError(f"{where}a role is a name or {{name: {{params}}}}, got {item!r}")
        for name, params in item.items():
            if not isinstance(name, str):
                raise ValueError(f"{where}a role name is a string, got {name!r}")
            if params is not None and not isinstance(params, dict):
                raise ValueError(f"{where}role {name!r}: its parameters are a mapping {{param: value}}, got {params!r}")
    return value


RoleParams = Union[dict[str, Any], None]
RolesField = Annotated[Union[list[Union[str, dict[str, RoleParams]]], dict[str, RoleParams]], BeforeValidator(_roles_shape)]


class GroupSpec(_Strict):
    """Peers that share roles, region, links and placement."""

    count: int = Field(ge=0)
    roles: RolesField = Field(default_factory=list)
    region: str | None = None
    uplink: float | None = None
    downlink: float | None = None
    resources: dict[str, float] = Field(default_factory=dict)
    num_cpus: float = Field(default=0.25, gt=0)
    peers_per_actor: int = Field(default=1, ge=1)
    dht: dict[str, Any] = Field(default_factory=dict)
    endpoint: dict[str, Any] = Field(default_factory=dict)  # Endpoint options, e.g. pool_size for packed peers
    churn: bool = True
    join_at: float = Field(default=0.0, ge=0)

    _rates = field_validator("uplink", "downlink", mode="before")(lambda cls, v: parse_rate(v))


class GraphSpec(_Strict):
    """Latencies from a networkx graph: peers sit on its nodes; latency = weighted shortest path."""

    generator: str
    params: dict[str, Any] = Field(default_factory=dict)
    scale: float = Field(default=0.05, gt=0)
    weight: str | None = None


class LatencySpec(_Strict):
    """One of: ``constant`` seconds, a ``regions`` matrix, or a ``graph`` generator."""

    constant: float | None = Field(default=None, ge=0)
    regions: dict[str, dict[str, float]] | None = None
    graph: GraphSpec | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "LatencySpec":
        given = [k for k in ("constant", "regions", "graph") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of constant, regions or graph, not {' and '.join(given)}")
        return self


class NetworkSpec(_Strict):
    shaping: bool = True
    latency: Union[float, LatencySpec] = 0.0
    jitter: float = Field(default=0.0, ge=0)
    loss: float = Field(default=0.0, ge=0, le=1)
    uplink: float | None = None
    downlink: float | None = None
    check_host_bandwidth: bool = True
    # CurveZMQ on every peer's endpoint, as in deployment; a study may turn it off for raw speed (then
    # nothing about a caller is proven: see docs/security.md)
    encryption: bool = True

    _rates = field_validator("uplink", "downlink", mode="before")(lambda cls, v: parse_rate(v))


class LifetimeSpec(_Strict):
    distribution: Literal["exponential", "weibull"] = "exponential"
    mean: float | None = Field(default=None, gt=0)
    shape: float | None = Field(default=None, gt=0)
    scale: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _params(self) -> "LifetimeSpec":
        if self.distribution == "exponential" and self.mean is None:
            raise ValueError("an exponential lifetime needs 'mean' (seconds)")
        if self.distribution == "weibull" and (self.shape is None or self.scale is None):
            raise ValueError("a weibull lifetime needs 'shape' and 'scale' (seconds)")
        return self


class KillSpec(_Strict):
    """A scheduled kill at time ``at``: named ``peers``, or a ``fraction`` of a ``group``'s live peers."""

    at: float = Field(ge=0)
    peers: list[str] | None = None
    fraction: float | None = Field(default=None, gt=0, le=1)
    group: str | None = None
    mode: Literal["abrupt", "graceful"] | None = None
    rejoin_after: float | None = None

    @model_validator(mode="after")
    def _what(self) -> "KillSpec":
        if (self.peers is None) == (self.fraction is None):
            raise ValueError("a kill names either 'peers' or a 'fraction' (of 'group', or of all peers)")
        return self


class ChurnSpec(_Strict):
    lifetime: LifetimeSpec | None = None
    mode: Literal["abrupt", "graceful"] = "abrupt"
    rejoin_after: float | None = Field(default=None, ge=0)
    identity: Literal["fresh", "same"] = "fresh"
    kills: list[KillSpec] = Field(default_factory=list)


class StragglerSpec(_Strict):
    """Slowed peers: their uplink and downlink are divided by ``slowdown`` for the whole run."""

    group: str | None = None
    fraction: float = Field(default=0.1, gt=0, le=1)
    slowdown: float = Field(default=4.0, ge=1)


class PartitionSpec(_Strict):
    """From ``at`` for ``duration`` seconds, the listed groups (or a random ``fraction``) are cut off."""

    at: float = Field(ge=0)
    duration: float = Field(gt=0)
    groups: list[str] | None = None
    fraction: float | None = Field(default=None, gt=0, lt=1)

    @model_validator(mode="after")
    def _which(self) -> "PartitionSpec":
        if (self.groups is None) == (self.fraction is None):
            raise ValueError("a partition names either 'groups' or a 'fraction' of peers to cut off")
        return self


class FaultSpec(_Strict):
    stragglers: list[StragglerSpec] = Field(default_factory=list)
    partitions: list[PartitionSpec] = Field(default_factory=list)


class WorkloadSpec(_Strict):
    module: str
    params: dict[str, Any] = Field(default_factory=dict)
    groups: list[str] | None = None


class RaySpec(_Strict):
    address: str | None = None
    num_cpus: float | None = None


class Topology(_Strict):
    name: str
    seed: int = 0
    duration: float = Field(gt=0)
    results_dir: str = "results"
    groups: dict[str, GroupSpec]
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    churn: ChurnSpec = Field(default_factory=ChurnSpec)
    faults: FaultSpec = Field(default_factory=FaultSpec)
    workload: WorkloadSpec
    ray: RaySpec = Field(default_factory=RaySpec)
    bootstrap_timeout: float = Field(default=120.0, gt=0)
    actor_timeout: float = Field(default=120.0, gt=0)  # seconds any one call to a peer actor may take
    collect_every: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _references(self) -> "Topology":
        if not self.groups or sum(g.count for g in self.groups.values()) == 0:
            raise ValueError("a topology needs at least one peer")
        if all(g.join_at > 0 for g in self.groups.values() if g.count):
            raise ValueError("every group has a join_at: at least one group must start at time 0")
        names = set(self.groups)
        refs = [("workload.groups", g) for g in self.workload.groups or []]
        refs += [("churn.kills.group", k.group) for k in self.churn.kills if k.group]
        refs += [("faults.stragglers.group", s.group) for s in self.faults.stragglers if s.group]
        refs += [("faults.partitions.groups", g) for p in self.faults.partitions for g in p.groups or []]
        for where, group in refs:
            if group not in names:
                raise ValueError(f"{where}: no group named {group!r} (groups: {', '.join(sorted(names))})")
        latency = self.network.latency
        if isinstance(latency, LatencySpec) and latency.regions is not None:
            regions = set(latency.regions) | {r for row in latency.regions.values() for r in row}
            for name, group in self.groups.items():
                if group.region is None or group.region not in regions:
                    raise ValueError(f"groups.{name}.region must be one of the latency regions: {', '.join(sorted(regions))}")
        return self

    def peer_names(self) -> list[str]:
        return [f"{group}.{i}" for group, spec in self.groups.items() for i in range(spec.count)]


class PeerConfig(_Strict):
    """A ``hivesim peer --config`` file: one real peer, the same role syntax as a topology's groups."""

    name: str = "volunteer"
    roles: RolesField = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    advertise_host: str | None = None
    dht: dict[str, Any] = Field(default_factory=dict)
    endpoint: dict[str, Any] = Field(default_factory=dict)


def _read(path: Path, overrides: list[str] | tuple[str, ...], what: str) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """The file's mapping after overrides and interpolation, and the line of every key."""
    try:
        text = path.read_text()
    except OSError as e:
        raise TopologyError(f"cannot read {what} {path}: {e.strerror}") from None
    lines = _key_lines(text, path)
    try:
        config = OmegaConf.create(text)
        if overrides:
            for item in overrides:
                if "=" not in item:
                    raise TopologyError(f"override {item!r} is not key=value")
            config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
        resolved = OmegaConf.to_container(config, resolve=True)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise TopologyError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    except OmegaConfBaseException as e:
        raise TopologyError(f"{path}: {str(e).splitlines()[0]}") from None
    if resolved is None and what == "peer config":
        resolved = {}
    if not isinstance(resolved, dict):
        keys = "name, groups, workload, ..." if what == "topology" else "name, roles, host, port, dht, ..."
        raise TopologyError(f"{path}: a {what} is a mapping of keys ({keys})")
    return resolved, lines


def load_topology(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Topology, dict[str, Any]]:
    """Read, override, interpolate and validate a topology. Returns the model and the resolved dict.

    This checks the file's own structure; :func:`check_runnable` also checks what the run will import."""
    path = Path(path)
    resolved, lines = _read(path, overrides, "topology")
    resolved.setdefault("name", path.stem)
    try:
        return Topology.model_validate(resolved), resolved
    except ValidationError as e:
        raise TopologyError(_explain(e, path, lines, overrides)) from None


def check_runnable(topology: Topology, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Import every role and the workload and check their parameters (and DHT options) against the
    signatures that will receive them, before any actor starts: a typo costs a second, not a Ray
    traceback a minute later. Raises :class:`TopologyError` listing every problem with its line."""
    from hivesim.sim.checks import options_problems, role_problems, workload_problems

    path = Path(path)
    problems = []
    for name, group in topology.groups.items():
        problems += role_problems(group.roles, ("groups", name, "roles"))
        problems += options_problems("dht", group.dht, ("groups", name, "dht"))
        problems += options_problems("endpoint", group.endpoint, ("groups", name, "endpoint"))
    problems += workload_problems(topology.workload.module, topology.workload.params, ("workload",))
    if problems:
        raise TopologyError(_report("invalid topology", problems, path, overrides))


def load_peer_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> PeerConfig:
    """Read and check a ``hivesim peer`` config (command-line values in ``overrides`` win): its keys, its
    roles (they import, their parameters fit) and its DHT/endpoint options, each error with its line."""
    from hivesim.sim.checks import options_problems, role_problems

    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if path is None:
        resolved, lines, where = {}, {}, Path("(command line)")
    else:
        where = Path(path)
        resolved, lines = _read(where, (), "peer config")
    flags = [f"{k}=" for k in given]  # reported as command-line values
    resolved.update(given)
    try:
        config = PeerConfig.model_validate(resolved)
    except ValidationError as e:
        raise TopologyError(_explain(e, where, lines, flags, root=PeerConfig, title="invalid peer config")) from None
    problems = role_problems(config.roles, ("roles",))
    problems += options_problems("dht", config.dht, ("dht",))
    problems += options_problems("endpoint", config.endpoint, ("endpoint",))
    if problems:
        raise TopologyError(_report("invalid peer config", problems, where, flags, lines))
    return config


def locate(path: Path, lines: dict[tuple[str, ...], int], loc: tuple[str, ...], overrides: Any = ()) -> str:
    """``file:line`` of the nearest key of ``loc`` that the file has, or the command-line override that set it."""
    key = ".".join(loc)
    for item in overrides or ():
        name = item.split("=", 1)[0]
        if key == name or key.startswith(name + "."):
            return f"command-line override {name}" if name == key else f"command-line override {name} ({key})"
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return f"{path}:{lines[loc[:n]]}"
    return str(path)


def _report(title: str, problems: list[tuple[tuple[str, ...], str]], path: Path, overrides: Any = (),
            lines: dict[tuple[str, ...], int] | None = None) -> str:
    if lines is None:
        try:
            lines = _key_lines(path.read_text(), path)
        except OSError:
            lines = {}
    messages = []
    for loc, problem in problems:
        where = locate(path, lines, loc, overrides)
        key = ".".join(loc)
        messages.append(f"{where}: {problem}" if where.startswith("command-line override") and where.endswith(key)
                        else f"{where}: {key}: {problem}")
    unique = list(dict.fromkeys(messages))
    more = f"\n  ... and {len(unique) - 12} more" if len(unique) > 12 else ""
    return f"{title}:\n  " + "\n  ".join(unique[:12]) + more


def _key_lines(text: str, path: Path) -> dict[tuple[str, ...], int]:
    """Line number (1-based) of every key path in the YAML text."""
    out: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return out

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = (*prefix, str(key.value))
                out[name] = key.start_mark.line + 1
                walk(value, name)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                name = (*prefix, str(i))
                out[name] = item.start_mark.line + 1
                walk(item, name)

    walk(root, ())
    return out


def _explain(error: ValidationError, path: Path, lines: dict[tuple[str, ...], int], overrides: Any,
             root: Any = None, title: str = "invalid topology") -> str:
    messages = []
    for err in error.errors():
        loc = tuple(str(p) for p in err["loc"] if not str(p).startswith(("function-", "union", "float", "LatencySpec")))
        key = ".".join(loc) or "(top level)"
        line = None
        for n in range(len(loc), 0, -1):
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
        where = f"{path}:{line}" if line else str(path)
        if any(o.split("=", 1)[0] == key for o in overrides):
            where = f"command-line override {key}"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            siblings = _known_keys(loc[:-1], root or Topology)
            close = difflib.get_close_matches(loc[-1], siblings, n=1)
            message = f"unknown key {loc[-1]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            if siblings:
                message += f"; allowed here: {', '.join(sorted(siblings))}"
        elif err["type"] == "missing":
            message = "required key is missing"
        elif "input" in err and err["type"] not in ("value_error",):
            message += f" (got {err['input']!r})"
        messages.append(f"{where}: {key}: {message}")
    unique = list(dict.fromkeys(messages))
    return f"{title}:\n  " + "\n  ".join(unique[:8])


def _known_keys(loc: tuple[str, ...], root: Any = None) -> list[str]:
    """The keys allowed at a path, for "did you mean" hints."""
    model: Any = root or Topology
    i = 0
    while i < len(loc):
        fields = getattr(model, "model_fields", None)
        if not fields or loc[i] not in fields:
            return []
        annotation = fields[loc[i]].annotation
        inner = _model_of(annotation)
        if inner is None:
            return []
        if _is_container(annotation):
            i += 1  # skip a group's free-form name, or a list index
        model = inner
        i += 1
    return list(getattr(model, "model_fields", {}))


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _is_container(annotation: Any) -> bool:
    origin = getattr(annotation, "__origin__", None)
    if origin in (dict, list):
        return True
    return any(_is_container(a) for a in getattr(annotation, "__args__", ()) or () if a is not type(None))
