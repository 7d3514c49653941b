"""Checking, before anything starts, what a run or a peer will import and instantiate.

A topology (or a ``hivesim peer`` config) names roles, a workload module and their parameters; a typo
there used to surface a minute later as a Ray traceback from inside an actor. Everything that can be
checked without a network is checked here, in the driver, before Ray starts: every role and the workload
import, every parameter name exists in the signature of the class that receives it (following ``**kwargs``
that a class hands on to its base or to a helper, as ``AveragerRole`` does to ``AveragerCore``), values
match their annotations, required parameters are given, and DHT/endpoint options are known. Problems are
reported together, as ``file:line: key.path: problem (did you mean ...?)``.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import pkgutil
import sys
import textwrap
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

Loc = tuple[str, ...]
Problem = tuple[Loc, str]


# ------------------------------------------------------------------ signatures


class Accepted:
    """The keyword parameters a callable takes, after following where its ``**kwargs`` go."""

    def __init__(self) -> None:
        self.params: dict[str, inspect.Parameter] = {}
        self.hints: dict[str, Any] = {}
        self.required: set[str] = set()
        self.open = False  # some **kwargs go somewhere we cannot follow: accept any name


def accepted_params(target: Any, skip: int = 0, exclude: Iterable[str] = ()) -> Accepted:
    """What ``target(<skip positional args>, **params)`` accepts as ``params``; ``target`` is a class
    (its ``__init__``) or a function. Never raises: what cannot be inspected is left open."""
    out = Accepted()
    try:
        _collect(target, skip, set(exclude), out, depth=0, top=True)
    except Exception:  # a C extension, a lambda without source...: accept anything rather than refuse a run
        out.open = True
    return out


def _function_of(target: Any) -> tuple[Callable, type | None, int]:
    """(function, class that defines it or None, positional parameters consumed implicitly)."""
    if inspect.isclass(target):
        for owner in target.__mro__:
            if "__init__" in owner.__dict__:
                init = owner.__dict__["__init__"]
                if owner is object:
                    raise TypeError("object.__init__")
                return init, owner, 1
        raise TypeError("no __init__")
    if inspect.ismethod(target):
        return target.__func__, getattr(target.__self__, "__mro__", (type(target.__self__),))[0], 1
    return target, None, 0


def _collect(target: Any, skip: int, exclude: set[str], out: Accepted, depth: int, top: bool,
             mro: tuple[type, ...] | None = None) -> None:
    if depth > 6:
        out.open = True
        return
    func, owner, implicit = _function_of(target)
    if mro is None and inspect.isclass(target):
        mro = target.__mro__
    signature = inspect.signature(func)
    parameters = list(signature.parameters.values())[implicit:]
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_POSITIONAL for p in parameters) and skip > len(positional):
        skip = len(positional)
    skipped = {p.name for p in positional[:skip]}
    try:
        hints = typing.get_type_hints(func)
    except Exception:
        hints = {}
    varkw = None
    for p in parameters:
        if p.name in skipped or p.name in exclude or p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL):
            continue
        if p.kind is p.VAR_KEYWORD:
            varkw = p.name
            continue
        out.params.setdefault(p.name, p)
        if p.name in hints:
            out.hints.setdefault(p.name, hints[p.name])
        if top and p.default is p.empty:
            out.required.add(p.name)
    if varkw is None:
        return
    for callee, call in _forwarded_to(func, varkw, owner, mro or ()):
        if callee is None:
            out.open = True
            continue
        given = {k.arg for k in call.keywords if k.arg is not None}
        _collect(callee, len(call.args), exclude | given | skipped, out, depth + 1, top=False,
                 mro=mro if _is_super_call(call) else None)


def _is_super_call(call: ast.Call) -> bool:
    f = call.func
    return (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Call) and isinstance(f.value.func, ast.Name)
            and f.value.func.id == "super")


_READS = {"get", "pop", "setdefault", "update"}  # key reads and additions: the rest still goes on


def _forwarded_to(func: Callable, varkw: str, owner: type | None, mro: tuple[type, ...]) -> list[tuple[Any, ast.Call]]:
    """The callables that ``**varkw`` is handed to in ``func``'s body, as (callable or None, call node).
    A use of ``varkw`` we cannot follow (stored, iterated, passed whole) yields (None, ...): open."""
    source = textwrap.dedent(inspect.getsource(func))
    tree = ast.parse(source)
    parents: dict[int, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = node
    found: list[tuple[Any, ast.Call]] = []
    dummy = ast.Call(func=ast.Name(id="?"), args=[], keywords=[])
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and node.id == varkw) or isinstance(parents.get(id(node)), ast.arguments):
            continue
        parent = parents.get(id(node))
        if isinstance(parent, ast.keyword) and parent.arg is None:
            call = parents.get(id(parent))
            if isinstance(call, ast.Call):
                if any(isinstance(a, ast.Starred) for a in call.args):
                    found.append((None, call))
                else:
                    found.append((_resolve(call.func, func, owner, mro), call))
                continue
        if isinstance(parent, ast.Attribute) and parent.attr in _READS:
            continue
        if isinstance(parent, ast.Subscript) or isinstance(parent, ast.Compare):
            continue
        if isinstance(node, ast.Name) and isinstance(parent, ast.arg):
            continue
        found.append((None, dummy))
    if not found:
        found.append((None, dummy))  # **kwargs accepted and dropped or kept: anything goes
    return found


def _resolve(expr: ast.expr, func: Callable, owner: type | None, mro: tuple[type, ...]) -> Any:
    if _is_super_call(ast.Call(func=expr, args=[], keywords=[])) and owner is not None:
        attr = expr.attr  # type: ignore[attr-defined]
        order = list(mro) if owner in mro else list(owner.__mro__)
        for cls in order[order.index(owner) + 1:]:
            if attr in cls.__dict__:
                if cls is object:
                    return None
                return cls if attr == "__init__" else cls.__dict__[attr]
        return None
    names: list[str] = []
    while isinstance(expr, ast.Attribute):
        names.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name):
        return None
    scope = dict(getattr(func, "__globals__", {}))
    value = scope.get(expr.id, getattr(__import__("builtins"), expr.id, None))
    for name in reversed(names):
        value = getattr(value, name, None)
    if value is None or value is dict:
        return None
    return value if callable(value) else None


def check_params(target: Any, params: Mapping[str, Any] | None, loc: Loc, *, skip: int = 0,
                 exclude: Iterable[str] = (), what: str = "parameter", of: str = "") -> list[Problem]:
    """Problems with calling ``target(<skip positional>, **params)``: unknown names (with a suggestion),
    missing required ones, values that do not match the annotation. ``of`` names the receiver in messages."""
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        return [(loc, f"expected a mapping of {what}s (name: value){' for ' + of if of else ''}, got {params!r}")]
    accepted = accepted_params(target, skip, exclude)
    problems: list[Problem] = []
    known = sorted(accepted.params)
    owner = f" of {of}" if of else ""
    for name, value in params.items():
        name = str(name)
        if name not in accepted.params:
            if accepted.open:
                continue
            close = difflib.get_close_matches(name, known, n=1)
            message = f"unknown {what} {name!r}{owner}" + (f" (did you mean {close[0]!r}?)" if close else "")
            if not known:
                message += "; it takes none"
            elif len(known) <= 16:
                message += f"; known: {', '.join(known)}"
            problems.append(((*loc, name), message))
            continue
        hint = accepted.hints.get(name)
        if hint is not None:
            problem = _type_problem(hint, value)
            if problem:
                problems.append(((*loc, name), problem))
    for name in sorted(accepted.required - set(map(str, params))):
        problems.append(((*loc, name), f"required {what}{owner} is missing"))
    return problems


def _type_problem(hint: Any, value: Any) -> str | None:
    from pydantic import TypeAdapter, ValidationError

    try:
        adapter = TypeAdapter(hint)
    except Exception:
        return None  # a type pydantic cannot check (a Protocol, a class): the callee decides
    try:
        adapter.validate_python(value)
    except ValidationError as e:
        first = e.errors()[0]
        return f"{first['msg']} (got {value!r})"
    except Exception:
        return None
    return None


# ------------------------------------------------------------------ imports


def _ensure_cwd_on_path() -> None:
    """``experiments.*`` and ``analysis.*`` resolve from the repository root, as the runner's actors see it."""
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))


def import_module(name: str, loc: Loc, what: str) -> tuple[Any, list[Problem]]:
    """Import ``name``; on failure a problem that says why, with a suggestion for a misspelt module."""
    _ensure_cwd_on_path()
    if not isinstance(name, str) or not name or any(not part.isidentifier() for part in name.split(".")):
        return None, [(loc, f"{what} {name!r} is not a module path (e.g. experiments.dht_lookup)")]
    try:
        return importlib.import_module(name), []
    except ModuleNotFoundError as e:
        missing = e.name or name
        if not (name == missing or name.startswith(missing + ".")):
            return None, [(loc, f"{what} {name!r} cannot be imported: it needs {missing!r}, which is not installed")]
        parent, _, leaf = missing.rpartition(".")
        siblings = _submodules(parent)
        close = difflib.get_close_matches(leaf, siblings, n=1)
        hint = f" (did you mean {'.'.join(filter(None, [parent, close[0]]))!r}?)" if close else ""
        where = "" if parent or close else "; run from the repository root, or install the package"
        return None, [(loc, f"no module named {missing!r}{hint}{where}")]
    except Exception as e:  # a syntax error, an exception at import time
        return None, [(loc, f"{what} {name!r} fails to import: {type(e).__name__}: {e}")]


def _submodules(package: str) -> list[str]:
    if not package:
        return sorted({m.name for m in pkgutil.iter_modules([str(Path.cwd())])})
    try:
        module = importlib.import_module(package)
    except Exception:
        return []
    return sorted(m.name for m in pkgutil.iter_modules(getattr(module, "__path__", [])))


def builtin_roles() -> list[str]:
    import hivesim.roles

    return sorted(m.name for m in pkgutil.iter_modules(hivesim.roles.__path__))


def resolve_role(spec: Any, loc: Loc) -> tuple[Any, list[Problem]]:
    """The Role class a role name stands for (what :func:`hivesim.roles.load_role` loads), or problems."""
    from hivesim.roles import Role

    if not isinstance(spec, str) or not spec.strip():
        return None, [(loc, f"a role is a name (averager) or 'module:Class', got {spec!r}")]
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
    else:
        builtins = builtin_roles()
        if spec not in builtins:
            close = difflib.get_close_matches(spec, builtins, n=1)
            return None, [(loc, f"unknown role {spec!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                           + f"; built-in roles: {', '.join(builtins)}; a custom role is 'module:Class'")]
        module_name, attribute = f"hivesim.roles.{spec}", "ROLE"
    module, problems = import_module(module_name, loc, "role module")
    if module is None:
        return None, problems
    role = getattr(module, attribute, None)
    if not (isinstance(role, type) and issubclass(role, Role)):
        candidates = [n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, Role) and v is not Role]
        close = difflib.get_close_matches(attribute, candidates, n=1)
        what = "has no" if role is None else "has, but it is not a Role subclass,"
        return None, [(loc, f"{module_name} {what} {attribute!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                       + (f"; Role classes there: {', '.join(sorted(candidates))}" if candidates else ""))]
    return role, []


def role_problems(roles: Any, loc: Loc) -> list[Problem]:
    """Every role of a ``roles:`` entry (a list of names or of ``{name: params}``, or a mapping) imports,
    and its parameters fit its ``__init__`` (after the peer)."""
    problems: list[Problem] = []
    for role_loc, name, params in iter_roles(roles, loc):
        if name == "dht":
            continue  # every peer is a DHT node; ``dht`` in a role list is allowed and ignored
        cls, found = resolve_role(name, role_loc)
        problems += found
        if cls is not None:
            problems += check_params(cls, params or {}, role_loc, skip=1, of=f"role {name!r}")
    return problems


def iter_roles(roles: Any, loc: Loc) -> list[tuple[Loc, Any, Any]]:
    """(location, name, params) of every role in a ``roles:`` entry, in any of its three shapes."""
    out: list[tuple[Loc, Any, Any]] = []
    if roles is None:
        return out
    if isinstance(roles, Mapping):
        return [((*loc, str(k)), k, v) for k, v in roles.items()]
    for i, item in enumerate(roles):
        if isinstance(item, Mapping):
            out += [((*loc, str(i), str(k)), k, v) for k, v in item.items()]
        else:
            out.append(((*loc, str(i)), item, None))
    return out


def workload_problems(module_name: str, params: Mapping[str, Any] | None, loc: Loc) -> list[Problem]:
    """The workload module imports, has a ``ROLE``, and ``params`` fit ``ROLE.__init__`` (after the peer)."""
    from hivesim.roles import Role

    module, problems = import_module(module_name, (*loc, "module"), "workload module")
    if module is None:
        return problems
    role = getattr(module, "ROLE", None)
    if not (isinstance(role, type) and issubclass(role, Role)):
        return [((*loc, "module"), f"{module_name} has no ROLE (the Role class each peer of the workload runs)")]
    return check_params(role, params or {}, (*loc, "params"), skip=1, of=f"workload {module_name}")


_GIVEN_BY_PEER = {"dht": ("initial_peers", "endpoint", "identity"),
                  "endpoint": ("host", "port", "links", "advertise_host", "identity")}


def options_problems(kind: str, options: Mapping[str, Any] | None, loc: Loc) -> list[Problem]:
    """``dht:`` options are keyword arguments of ``DHTNode.create``, ``endpoint:`` ones of ``Endpoint``
    (those a peer sets itself excluded)."""
    if not options:
        return []
    if kind == "dht":
        from hivesim.dht.node import DHTNode

        target: Any = DHTNode.create
    else:
        from hivesim.net.rpc import Endpoint

        target = Endpoint
    return check_params(target, options, loc, exclude=_GIVEN_BY_PEER[kind], what="option",
                        of="DHTNode.create" if kind == "dht" else "Endpoint")
