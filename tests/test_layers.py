"""The layers hold: imports point down only (the README's layout section draws them).

Every module of ``busd/`` is read with ``ast`` — every import, at the top or inside a function,
absolute or relative — and each edge is checked against the rules below, which are data: a
restructuring changes the tables, not the checker. A forbidden edge fails its rule's test,
named as ``busd/validate.py:12 imports busd.catalog``.

A *component* is a top-level name under ``busd``: ``busd/catalog.py`` is ``busd.catalog``, and
every module of a package such as ``busd/source/`` belongs to ``busd.source``. Imports within a
component are always allowed.
"""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "busd"
REPO = Path(__file__).resolve().parent.parent

# ---- the rules, as data ------------------------------------------------------------------------
# Base: types, settings, errors, logging; they import no other busd module but each other.
BASE = (
    "busd.model",
    "busd.config",
    "busd.config_nats",
    "busd.errors",
    "busd.log",
    "busd.sql",
    "busd.faults",
)
# Base as well, as long as they import only base (else they are simply not base): leaves that
# many layers share — systemd's notify socket, the in-flight ledger, durable file writes,
# busd's count of its deaths holding a message, and the exports' on-disk format (split out of
# exports.py; replay, orphans and the CLI read it).
BASE_IF_PURE = (
    "busd.sdnotify",
    "busd.inflight",
    "busd.durable",
    "busd.deaths",
    "busd.manifest",
)
# Stages: one job each; they import only the base layer.
STAGES = (
    "busd.source",
    "busd.events",
    "busd.validate",
    "busd.checker",
    "busd.catalog",
    "busd.exports",
)
# The single exception: the checker runs validate's checks.
STAGE_EDGES_ALLOWED = {("busd.checker", "busd.validate")}
# Entry points: nobody imports them, but themselves, the CLI the bench, and `python -m busd`.
CLI = ("busd.cli", "busd.cli_*")
BENCH = ("busd.bench", "busd.bench_*")
MAIN = ("busd.__main__",)
ENTRY_IMPORTERS = {"cli": (*CLI, *MAIN), "bench": (*BENCH, *CLI, *MAIN)}
# One door to NATS: only the source imports the client library.
NATS_DOOR = ("busd.source",)
NATS_KNOWN_EXCEPTIONS: set[str] = set()  # components still importing nats: none
# The package root holds only `__version__` and a lazy re-export: importing it is neutral.
NEUTRAL = (PACKAGE,)


@dataclass(frozen=True)
class Tree:
    """The package's modules and every import they make."""

    modules: frozenset[str]
    edges: tuple[Edge, ...]

    @property
    def components(self) -> set[str]:
        return {component(m) for m in self.modules}


@dataclass(frozen=True)
class Edge:
    """One import: ``importer`` (a module) at ``where`` (file:line) imports ``target``."""

    importer: str
    where: str
    target: str  # a dotted module name ("busd.catalog", "nats.js.errors")

    def __str__(self) -> str:
        return f"{self.where} imports {self.target}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def component(module: str) -> str:
    """``busd.source.pull`` → ``busd.source``; other packages' names stay whole."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == PACKAGE else module


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def modules_of(root: Path) -> dict[str, Path]:
    """Every module of the package under ``root`` (the directory that holds ``busd/``)."""
    return {module_name(path, root): path for path in sorted((root / PACKAGE).rglob("*.py"))}


def read_tree(root: Path) -> Tree:
    """Every import of every module of the package, resolved to module names: ``from busd
    import catalog`` is ``busd.catalog`` when that module exists, ``from busd.model import
    Delivery`` is ``busd.model``; relative imports are resolved against the importer."""
    modules = modules_of(root)
    edges: list[Edge] = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where_of = path.relative_to(root).as_posix()
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    base = package[: len(package) - (node.level - 1)]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in modules else source)
            edges += [Edge(name, f"{where_of}:{node.lineno}", t) for t in targets]
    return Tree(frozenset(modules), tuple(dict.fromkeys(edges)))  # one per name imported


def base_components(tree: Tree) -> set[str]:
    """The base layer: ``BASE``, and each of ``BASE_IF_PURE`` that exists and imports only
    base."""
    base = set(BASE)
    for candidate in set(BASE_IF_PURE) & tree.components:
        own = {component(e.target) for e in tree.edges if component(e.importer) == candidate}
        busd = {t for t in own if t.split(".")[0] == PACKAGE} - {candidate, *NEUTRAL}
        if busd <= base:
            base.add(candidate)
    return base


def internal(tree: Tree) -> Iterable[tuple[Edge, str, str]]:
    """The edges between two different busd components: (edge, from, to)."""
    for edge in tree.edges:
        src, dst = component(edge.importer), component(edge.target)
        if dst.split(".")[0] == PACKAGE and src != dst and dst not in NEUTRAL:
            yield edge, src, dst


# ---- the checks: each returns the forbidden edges, as lines to print -------------------------
def base_violations(tree: Tree) -> list[str]:
    base = base_components(tree)
    return [
        f"{e}: the base layer imports only base ({', '.join(sorted(base))})"
        for e, src, dst in internal(tree)
        if src in BASE and dst not in base
    ]


def stage_violations(tree: Tree) -> list[str]:
    base = base_components(tree)
    return [
        f"{e}: a stage imports only the base layer"
        for e, src, dst in internal(tree)
        if src in STAGES and dst not in base and (src, dst) not in STAGE_EDGES_ALLOWED
    ]


def entry_violations(tree: Tree) -> list[str]:
    out = []
    for e, src, dst in internal(tree):
        for what, patterns in (("cli", CLI), ("bench", BENCH)):
            if matches(dst, patterns) and not matches(src, ENTRY_IMPORTERS[what]):
                out.append(f"{e}: nothing imports the {what} (entry points only)")
    return out


def nats_violations(tree: Tree) -> list[str]:
    return [
        f"{e}: only {', '.join(NATS_DOOR)} imports nats"
        for e in tree.edges
        if (e.target == "nats" or e.target.startswith("nats."))
        and component(e.importer) not in (*NATS_DOOR, *NATS_KNOWN_EXCEPTIONS)
    ]


def violations(root: Path) -> list[str]:
    """Every forbidden edge of the package under ``root``, each check's in turn."""
    tree = read_tree(root)
    return [line for check in CHECKS.values() for line in check(tree)]


CHECKS = {
    "base": base_violations,
    "stages": stage_violations,
    "entry points": entry_violations,
    "one door to nats": nats_violations,
}


# ---- the real tree ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tree() -> Tree:
    return read_tree(REPO)


@pytest.mark.parametrize("rule", sorted(CHECKS))
def test_layers_hold(tree: Tree, rule: str) -> None:
    found = CHECKS[rule](tree)
    assert not found, f"{len(found)} forbidden import(s):\n" + "\n".join(found)


def test_the_rules_name_real_modules(tree: Tree) -> None:
    """A rule about a module that was renamed away would pass forever: every name the rules
    give exists (a module, or a package directory)."""
    named = [*BASE, *STAGES, *NATS_DOOR, *MAIN, "busd.cli", "busd.bench"]
    assert [n for n in named if n not in tree.components] == []
    assert len(tree.edges) > 100  # the checker saw the imports


# ---- the checker finds what it must: a synthetic tree -----------------------------------------
def write_tree(root: Path, files: dict[str, str]) -> Path:
    base = {
        "__init__.py": "",
        "model.py": "import json\n",
        "errors.py": "",
        "catalog.py": "from busd.model import x\n",
        "validate.py": "from busd import model\n",
        "checker.py": "from busd.validate import check\n",
        "cli/__init__.py": "",
        "cli/main.py": "from busd.bench import run\n",
        "bench/__init__.py": "",
        "bench/run.py": "from busd import catalog\n",
        "source/__init__.py": "from .pull import fetch\n",
        "source/pull.py": "import nats\nfrom nats.js.errors import NotFoundError\n",
        "__main__.py": "from busd.cli.main import main\n",
    }
    for rel, text in {**base, **files}.items():
        path = root / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_synthetic_tree_is_clean(tmp_path: Path) -> None:
    assert violations(write_tree(tmp_path, {})) == []


def test_a_stage_importing_a_stage_is_reported(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"validate.py": "from busd import model\nimport busd.catalog\n"})
    assert violations(root) == [
        "busd/validate.py:2 imports busd.catalog: a stage imports only the base layer"
    ]


@pytest.mark.parametrize(
    "text",
    [
        "from busd import catalog\n",
        "from busd.catalog import Catalog\n",
        "import busd.catalog\n",
        "import busd.catalog as c\n",
        "def late():\n    from busd.catalog import Catalog\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from busd import catalog\n",
        "from . import catalog\n",
        "from .catalog import Catalog\n",
    ],
    ids=[
        "from-package",
        "from-module",
        "import",
        "import-as",
        "in-function",
        "type-checking",
        "relative",
        "relative-from",
    ],
)
def test_every_form_of_import_is_seen(tmp_path: Path, text: str) -> None:
    found = violations(write_tree(tmp_path, {"validate.py": text}))
    assert len(found) == 1 and "busd/validate.py:" in found[0], found
    assert " imports busd.catalog: a stage imports only the base layer" in found[0]


def test_relative_import_in_a_package(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path, {"source/pull.py": "import nats\nfrom .. import exports\n", "exports.py": ""}
    )
    assert violations(root) == [
        "busd/source/pull.py:2 imports busd.exports: a stage imports only the base layer"
    ]


def test_base_importing_a_stage_is_reported(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"errors.py": "from busd.catalog import Catalog\n"})
    assert violations(root) == [
        "busd/errors.py:1 imports busd.catalog: the base layer imports "
        "only base (busd.config, busd.config_nats, busd.errors, "
        "busd.faults, busd.log, busd.model, busd.sql)"
    ]


def test_base_if_pure(tmp_path: Path) -> None:
    pure = write_tree(
        tmp_path / "pure",
        {
            "inflight.py": "from busd.model import x\n",
            "catalog.py": "from busd.inflight import Ledger\n",
        },
    )
    assert violations(pure) == []
    impure = write_tree(
        tmp_path / "impure",
        {
            "inflight.py": "from busd import settle\n",
            "catalog.py": "from busd.inflight import Ledger\n",
            "settle.py": "",
        },
    )
    assert violations(impure) == [
        "busd/catalog.py:1 imports busd.inflight: a stage imports only the base layer"
    ]


def test_importing_the_cli_or_the_bench_is_reported(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "fold.py": "from busd.cli import main\n",
            "bench/run.py": "from busd.cli.main import x\n",
            "bench_old.py": "",
            "replay.py": "import busd.bench_old\n",
        },
    )
    assert sorted(violations(root)) == [
        "busd/bench/run.py:1 imports busd.cli.main: nothing imports the cli (entry points only)",
        "busd/fold.py:1 imports busd.cli.main: nothing imports the cli (entry points only)",
        "busd/replay.py:1 imports busd.bench_old: nothing imports the bench (entry points only)",
    ]


def test_nats_outside_the_source_is_reported(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {"lag.py": "def f():\n    import nats.js.errors\n", "fold.py": "from nats.js import api\n"},
    )
    assert sorted(violations(root)) == [
        "busd/fold.py:1 imports nats.js: only busd.source imports nats",
        "busd/lag.py:2 imports nats.js.errors: only busd.source imports nats",
    ]
