"""The agent installs and imports with only the `agent` extra.

Two checks: (1) every module of the ``agent`` package imports in a fresh interpreter in which
the controller-side packages (kubernetes, fastapi, sqlmodel, ...) and ``controller`` itself
cannot be imported; (2) the `agent` extra of pyproject.toml, followed through the installed
packages' own requirements, never reaches those packages. `make test-agent-py310` also
installs `.[agent]` alone into a Python 3.10 venv and imports the agent there.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("kubernetes", "fastapi", "starlette", "sqlmodel", "sqlalchemy", "aiomqtt",
             "httpx", "uvicorn", "onnx", "jsonschema", "controller")

BLOCKER = f"""
import importlib.abc, sys, pkgutil, importlib
FORBIDDEN = {FORBIDDEN!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"agent imported forbidden module {{name}}")
        return None
sys.meta_path.insert(0, Block())
import agent
names = [m.name for m in pkgutil.walk_packages(agent.__path__, "agent.")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_every_agent_module_imports_without_controller_side_packages() -> None:
    proc = subprocess.run([sys.executable, "-c", BLOCKER], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip().splitlines()[-1]) > 20  # it really walked the package


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _closure(names: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        # only unconditional requirements: extras of dependencies are not installed by ours
        todo.extend(_name(r) for r in reqs if "extra ==" not in r)
    return seen


def test_agent_extra_does_not_pull_controller_packages() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = [_name(r) for r in project["dependencies"] + project["optional-dependencies"]["agent"]]
    assert "onnxruntime" in direct and "paho-mqtt" in direct
    reached = _closure(direct)
    bad = sorted(reached & {"kubernetes", "fastapi", "starlette", "sqlmodel", "sqlalchemy"})
    assert not bad, f"the agent extra pulls in {bad}"
