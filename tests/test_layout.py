"""The package layout: the public module names resolve to the stage folders, ``import fxlra``
alone makes the modules the README uses available, and no module imports itself in a circle."""
import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import fxlra

PACKAGE = Path(fxlra.__file__).parent


PUBLIC = {"wiring": "fxlra.analysis.wiring", "plan": "fxlra.analysis.plan",
          "scope": "fxlra.analysis.scope", "rules": "fxlra.semantics.rules",
          "streams": "fxlra.codegen.streams", "distributed": "fxlra.runtime.distributed",
          "checkpoint": "fxlra.runtime.checkpoint", "data": "fxlra.train.data",
          "training": "fxlra.train.training"}


def test_public_module_names_are_the_stage_modules_and_import_fxlra_is_enough():
    """In a fresh process: ``import fxlra`` alone makes the modules the README uses available,
    and ``import fxlra.wiring`` (each public name) is its stage module."""
    code = ["import importlib, fxlra",
            "assert callable(fxlra.models.ResNet18) and fxlra.nn.PerturbativeConv2d",
            "assert callable(fxlra.diagnostics.error_angles)",
            "assert callable(fxlra.distributed.init) and callable(fxlra.wiring.blocks)",
            "assert callable(fxlra.kernels.available)"]
    for name, where in PUBLIC.items():
        code += [f"import fxlra.{name} as public",
                 f"from fxlra.{name} import __name__ as named",
                 f"assert public is importlib.import_module({where!r}), public",
                 f"assert named == {where!r}, named"]
    out = subprocess.run([sys.executable, "-c", "\n".join(code)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path):
    """The fxlra modules a file imports (at module level or inside functions)."""
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{module}.{alias.name}")
            found.add(module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_module_of_the_package_imports_itself_in_a_circle():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    for name, path in files.items():
        graph.add_node(name)
        for imported in _imports(path):
            if imported in files and imported != name and not files[name].name == "__init__.py":
                graph.add_edge(name, imported)
    assert len(files) > 40 and graph.number_of_edges() > 60
    assert list(nx.simple_cycles(graph)) == []
