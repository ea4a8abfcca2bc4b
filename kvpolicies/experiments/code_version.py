"""The code version of a sweep cell: hashes of exactly the source files that can compute its result.

A cell is reused only while the code that computed it is unchanged. Which files count is read from the code itself,
not from a hand-kept list: every module that the cell runner can import (at module level or inside a function),
followed through the import statements of each file it reaches. Pages (``kvpolicies.reports``), the command line
and the benchmarks are never imported by the runner, so editing them keeps every finished cell; a new module that
the runner starts to import is counted the moment it is imported.

Only code counts: a Python file is hashed without its comments, documentation strings and blank lines
(:func:`code_only`), so a docstring or a comment edited in the engine keeps every finished cell.

The version has three parts, so that one change invalidates only what it can affect:
``VERSION+CORE/POLICY/TASK`` with CORE the runner's modules, POLICY the plugin modules that define the policy (and
its wrapped scorer) with whatever they import beyond the core, TASK the task's folder and what its code imports.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import inspect
import io
import tokenize
from collections.abc import Iterable
from pathlib import Path

from kvpolicies.engine.policy import Policy

RUNNER = "kvpolicies.experiments.runner"
"""The module that computes a cell (lm-eval through the kvpolicies model, memory and speed)."""
OURS = ("kvpolicies", "kvpolicies_plugins", "kvpolicies_evals")
"""Packages whose sources are hashed; third-party libraries are covered by the versions recorded with each cell."""


@functools.lru_cache(maxsize=None)  # sources do not change while a sweep runs; keys are computed many times
def imported_modules(path: Path) -> frozenset[str]:
    """Names of our modules that ``path`` imports anywhere (functions included), ``from a import b`` as ``a.b`` too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or node.level):
            base = node.module or ""
            if node.level:  # relative: resolved against the file's own package
                package = _module_name(path).rpartition(".")[0] if path.name != "__init__.py" else _module_name(path)
                base = importlib.util.resolve_name("." * node.level + base, package) if package else base
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return frozenset(name for name in found if name.split(".")[0] in OURS)


@functools.lru_cache(maxsize=None)
def module_file(name: str) -> Path | None:
    """The source file of module ``name`` (a package's ``__init__.py``), or None if ``name`` is not a module."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def reached(start: Iterable[Path]) -> set[Path]:
    """Every source file that ``start`` imports, transitively, with the ``__init__.py`` of each package on the way."""
    seen: set[Path] = set()
    todo = list(start)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
                file = module_file(".".join(parts[:depth]))
                if file is None:
                    break
                todo.append(file)
                if file.name != "__init__.py":  # a module: what follows is a name in it (``from a import b``)
                    break
    return seen


def digest(paths: Iterable[Path]) -> str:
    """One hash of ``paths``, each labelled by its place in its package (``kvpolicies_plugins/l2norm.py``), so that
    an editable checkout and an installed wheel of the same sources give the same version."""
    hashed = hashlib.sha256()
    for label, path in sorted((_label(path), path) for path in paths):
        hashed.update(label.encode())
        hashed.update(_file_digest(path))
    return hashed.hexdigest()


@functools.lru_cache(maxsize=None)
def _roots() -> tuple[tuple[str, Path], ...]:
    found = []
    for package in OURS:
        spec = importlib.util.find_spec(package)
        found += [(package, Path(location)) for location in (spec.submodule_search_locations or [])] if spec else []
    return tuple(found)


def _module_name(path: Path) -> str:
    label = _label(path).removesuffix(".py").removesuffix("/__init__")
    return label.replace("/", ".") if "/" in label else ""


def _label(path: Path) -> str:
    for package, root in _roots():
        if root in path.parents:
            return f"{package}/{path.relative_to(root).as_posix()}"
    return path.name


@functools.lru_cache(maxsize=None)
def _file_digest(path: Path) -> bytes:
    source = path.read_bytes()
    return hashlib.sha256(code_only(source) if path.suffix == ".py" else source).digest()


def code_only(source: bytes) -> bytes:
    """A Python source without its comments, documentation strings, blank lines and trailing spaces. None of those
    can change what a cell computes, so editing them keeps finished cells; anything else, an error message's
    wording or a call wrapped over other lines included, counts. The rest is the source's own text, not a syntax
    tree written back out, so one source has one version under every Python (``ast.unparse`` writes some
    expressions differently from one Python version to the next)."""
    text = source.decode("utf-8")
    lines = text.splitlines()
    cut: list[tuple[int, int, int, int]] = []  # (first line, first column, last line, end column), 0-based, chars

    def column(line: int, byte_offset: int) -> int:  # the AST counts columns in UTF-8 bytes
        return len(lines[line].encode("utf-8")[:byte_offset].decode("utf-8"))

    for node in ast.walk(ast.parse(source)):
        for field in ("body", "orelse", "finalbody"):
            statements = getattr(node, field, None)
            for statement in statements if isinstance(statements, list) else []:  # a lambda's body is one expression
                # A string statement does nothing (a docstring sets ``__doc__``, which no result reads).
                if (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
                        and isinstance(statement.value.value, str)):
                    first, last = statement.lineno - 1, statement.end_lineno - 1
                    cut.append((first, column(first, statement.col_offset), last,
                                column(last, statement.end_col_offset)))
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            (row, col), (end_row, end_col) = token.start, token.end
            cut.append((row - 1, col, end_row - 1, end_col))
    for first, start, last, end in sorted(cut, reverse=True):  # from the end, so earlier columns stay put
        lines[first:last + 1] = [lines[first][:start] + lines[last][end:]]
    return "\n".join(line.rstrip() for line in lines if line.strip()).encode("utf-8")


@functools.lru_cache(maxsize=1)
def core_files() -> frozenset[Path]:
    return frozenset(reached([module_file(RUNNER)]))


def defining_files(instance: object) -> set[Path]:
    """The source files of the classes ``instance`` is made of (its class and its bases)."""
    sources = set()
    for cls in type(instance).__mro__:
        try:
            source = Path(inspect.getsourcefile(cls) or "")
        except TypeError:  # builtins such as object
            continue
        if source.is_file():
            sources.add(source)
    return sources


def policy_files(policy: Policy) -> set[Path]:
    """The modules that define ``policy``'s classes (and its wrapped scorer's), and what they import."""
    sources = defining_files(policy)
    inner = getattr(policy, "scorer", None)
    if isinstance(inner, Policy):
        sources |= policy_files(inner)
    return reached(sources)


def codec_files(codec: str | None) -> set[Path]:
    """The modules that define storage codec ``codec`` (by registered name), and what they import."""
    if codec is None:
        return set()
    from kvpolicies.registry import get_codec

    return reached(defining_files(get_codec(codec)))


def task_files(task: str) -> set[Path]:
    """The task's own folder (its YAML and code) and the modules its code imports (the data generators)."""
    import kvpolicies_evals

    folder = Path(kvpolicies_evals.__file__).parent / "tasks" / task
    own = {path for path in folder.glob("*") if path.suffix in (".py", ".yaml")} if folder.is_dir() else set()
    return own | reached(path for path in own if path.suffix == ".py")


def code_version(policy: Policy | None = None, task: str | None = None, codec: str | None = None) -> str:
    """``VERSION+CORE[/POLICY[/TASK]]``: the hashes described in the module docstring; a storage ``codec`` (its
    registered name; None: full precision, part of the core) counts with the policy."""
    from importlib.metadata import version

    core = core_files()
    parts = [f"{version('kvpolicies')}+{digest(core)[:10]}"]
    if policy is not None:
        parts.append(digest((policy_files(policy) | codec_files(codec)) - core)[:8])
    if task is not None:
        parts.append(digest(task_files(task) - core)[:8])
    return "/".join(parts)
