"""The package structure holds: sans-IO modules load no trio and open no socket, `transport` is a
leaf, `bridge` never imports `tunnel`, and nothing on a hot path imports inside a function.

Read from the code itself (ast), so a new import anywhere is checked without listing it here."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("transport", "bridge", "tunnel", "bench")

# Modules documented as sans-IO: protocol logic only, no event loop, no sockets.
SANS_IO = (
    "transport", "transport.base", "transport.replay", "transport.address",
    "tunnel.noise", "tunnel.grammar", "tunnel.config", "tunnel.uapi", "tunnel.keys", "bridge.multihop",
    "bridge.shadowsocks", "bridge.spec", "bridge.lwo",
)

# Which package may import which: each only from those below it.
ALLOWED = {
    "transport": set(),
    "bridge": {"transport"},
    "tunnel": {"transport", "bridge"},
    "bench": {"transport", "bridge", "tunnel"},
}

# The command line is the composition root: `wgpy bench` dispatches to the bench package.
ENTRY_POINTS = {"tunnel/cli.py": {"bench"}}

# Where per-packet code runs: an import inside a function there is work (and a hidden edge) on
# every call. The CLI's lazy imports (tunnel/cli.py) keep `wgpy --help` fast and stay allowed.
HOT = ("transport", "bridge", "tunnel/noise", "tunnel/engine.py", "tunnel/tun.py")


def _modules(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _imported(tree: ast.AST, path: pathlib.Path) -> set[str]:
    """Top-level package names imported anywhere in the module (relative imports resolved)."""
    names = set()
    rel_parts = path.relative_to(ROOT).with_suffix("").parts
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = rel_parts[: len(rel_parts) - node.level]
                names.add(base[0] if base else rel_parts[0])
            elif node.module:
                names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_the_layers_below_it(package):
    wrong = []
    for path, tree in _modules(package):
        extra = ENTRY_POINTS.get(str(path.relative_to(ROOT)), set())
        for name in _imported(tree, path) & set(PACKAGES):
            if name != package and name not in ALLOWED[package] | extra:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_no_imports_inside_functions_on_hot_paths():
    found = []
    for place in HOT:
        paths = [ROOT / place] if place.endswith(".py") else sorted((ROOT / place).rglob("*.py"))
        for path in paths:
            tree = ast.parse(path.read_text())
            for fn in ast.walk(tree):
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for node in ast.walk(fn):
                        if isinstance(node, (ast.Import, ast.ImportFrom)):
                            found.append(f"{path.relative_to(ROOT)}:{node.lineno} in {fn.name}")
    assert not found, "\n".join(found)


PROBE = r"""
import socket, sys
class NoSockets(socket.socket):
    def __init__(self, *a, **k):
        raise AssertionError("a socket was opened while importing")
socket.socket = NoSockets
import importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m == "trio" or m.startswith("trio."))
print(",".join(loaded))
"""


def test_sans_io_modules_load_no_trio_and_open_no_socket():
    proc = subprocess.run([sys.executable, "-c", PROBE, *SANS_IO], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"trio loaded by a sans-IO module: {proc.stdout.strip()}"


def test_the_probe_would_see_trio():
    # The check above can fail: importing the engine does load trio.
    proc = subprocess.run([sys.executable, "-c", PROBE, "tunnel.engine"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "trio" in proc.stdout.split(",")
