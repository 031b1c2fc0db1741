"""The package's rooms and the direction of their dependencies, read from the imports of every module (ast).

cli -> auto_bridge -> engine -> registry -> mappings -> ops -> the compiled library; engine -> mcore and engine -> io.
Mappings are pure tensor transforms (no torch.distributed, no megatron); io knows nothing of mappings or the engine
(it reads quantized files with the ops);
``parallel_state`` appears only under mcore/. ``naming`` (the rules of Megatron parameter names, pure string rules)
depends on nothing, so that every room that reads or builds a Megatron name (mappings, registry, mcore, engine, cli)
takes the rules from it. ``testing`` (tiny checkpoints, parity helpers, the layout worlds of the end-to-end tests)
stands on top of auto_bridge, launch, io and mcore; nothing but cli imports it.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set, Tuple

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "megatron_bridge_ext"
NAME = "megatron_bridge_ext"

# room -> the rooms it may import (itself always allowed). A room is a subpackage or a top-level module.
ALLOWED: Dict[str, Set[str]] = {
    "_C": set(),
    "geometry": set(),
    "naming": set(),
    "ops": {"geometry", "_C"},
    "mappings": {"ops", "geometry", "naming"},
    "registry": {"mappings", "naming"},
    "dispatch": set(),
    "io": {"ops", "geometry"},  # a block-quantized source is read dequantized by the kernels (io/quantized.py)
    "mcore": {"ops", "geometry", "naming", "mappings", "io"},  # mappings: the layout names only (checked below); io:
    # the Megatron checkpoint layout (mcore.checkpoint builds the sharded state dicts it writes)
    "engine": {"ops", "geometry", "naming", "mappings", "registry", "dispatch", "mcore", "io"},
    "models": {"engine", "mappings", "registry", "mcore"},
    "auto_bridge": {"engine", "io", "mcore", "dispatch", "models"},
    "launch": set(),
    "testing": {"io", "mcore", "auto_bridge", "launch"},  # testing.worlds runs AutoBridge in spawned worlds
    "cli": {"auto_bridge", "launch", "testing", "io", "mcore", "engine", "dispatch", "naming"},
    "__init__": {"_C", "ops", "auto_bridge", "engine", "registry", "io", "dispatch"},
    "__main__": {"cli"},
}


def _modules() -> List[pathlib.Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _room(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: pathlib.Path) -> List[Tuple[int, str]]:
    """(line, absolute module name) of every import in the file, including those inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            base = node.module or ""
            out.append((node.lineno, base))
            if base == NAME:  # from megatron_bridge_ext import ops
                out += [(node.lineno, f"{NAME}.{a.name}") for a in node.names]
    return out


def _target_room(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else "__init__"


def test_every_module_is_in_a_known_room():
    rooms = {_room(p) for p in _modules()}
    assert rooms <= set(ALLOWED), sorted(rooms - set(ALLOWED))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_dependencies_point_one_way(path):
    room = _room(path)
    bad = []
    for line, module in _imports(path):
        if module == NAME or not module.startswith(NAME + "."):
            continue
        target = _target_room(module)
        if target != room and target not in ALLOWED[room]:
            bad.append(f"line {line}: {room} imports {module}")
        if room == "mcore" and target == "mappings" and module != f"{NAME}.mappings.base":
            bad.append(f"line {line}: mcore may use only the layout names of mappings.base, imports {module}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", [p for p in _modules() if _room(p) == "mappings"],
                         ids=lambda p: str(p.relative_to(PKG)))
def test_mappings_are_pure(path):
    bad = [f"line {line}: {module}" for line, module in _imports(path)
           if module == "torch.distributed" or module.startswith("torch.distributed.")
           or module == "megatron" or module.startswith("megatron.")]
    assert not bad, f"{path.name} must not communicate or know megatron: " + "; ".join(bad)


@pytest.mark.parametrize("path", [p for p in _modules() if _room(p) != "mcore"], ids=lambda p: str(p.relative_to(PKG)))
def test_parallel_state_only_in_mcore(path):
    tree = ast.parse(path.read_text())
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "parallel_state":
            uses.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "parallel_state":
            uses.append(node.lineno)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any("parallel_state" in n for n in names):
                uses.append(node.lineno)
    assert not uses, f"{path.relative_to(PKG)} uses parallel_state at lines {uses}; only mcore/ may"


def test_the_rules_catch_a_violation(tmp_path):
    """The checks above read real imports: a mapping that imports torch.distributed is caught."""
    fake = tmp_path / "bad.py"
    fake.write_text("import torch.distributed as dist\nfrom megatron.core import parallel_state\n"
                    "def f():\n    from megatron_bridge_ext.engine import bridge\n")
    mods = [m for _, m in _imports(fake)]
    assert "torch.distributed" in mods and "megatron.core" in mods and f"{NAME}.engine" in mods


def test_megatron_core_versions_are_read_only_in_mcore_versions():
    """What differs between megatron-core versions lives behind mcore/versions.py's helpers: no other module reads
    megatron-core's version (its package_info, its distribution metadata) or calls the helpers that return it."""
    readers = {"megatron_core_version", "installed_megatron_core", "parse_version", "package_info"}
    bad = []
    for path in _modules():
        if path.relative_to(PKG).as_posix() == "mcore/versions.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if isinstance(node, ast.alias):
                name = node.name.rsplit(".", 1)[-1]
            if name in readers:
                bad.append(f"{path.relative_to(PKG)}:{getattr(node, 'lineno', '?')}: {name}")
            if isinstance(node, ast.Constant) and node.value in ("megatron-core", "megatron_core"):
                bad.append(f"{path.relative_to(PKG)}:{node.lineno}: the distribution name {node.value!r}")
    assert not bad, "\n".join(bad)
