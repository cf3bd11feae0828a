"""The layout is the architecture: the serving side never loads torch, onnx or the training side.

Run in a fresh interpreter, because this test process may already have imported torch for other
tests. Every module under ``forecaster.serve`` (and the shared contract, evaluation and CLI entry)
is imported, then ``sys.modules`` is inspected.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import forecaster.serve

FORBIDDEN = ("torch", "onnx", "matplotlib", "forecaster.training")

PROBE = """
import importlib, json, sys
for name in {modules!r}:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def _serving_modules() -> list[str]:
    mods = [m.name for m in pkgutil.walk_packages(forecaster.serve.__path__, "forecaster.serve.")]
    return [
        *mods,
        "forecaster.model.bundle",
        "forecaster.evaluation.unroll",
        "forecaster.evaluation.output",
        "forecaster.cli",
    ]


def test_serving_side_imports_no_torch_nor_training() -> None:
    modules = _serving_modules()
    assert "forecaster.serve.engine" in modules, modules
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(modules=modules)],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = json.loads(out.stdout)
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, f"the serving side loaded {bad}"


def test_no_import_cycles_between_subpackages() -> None:
    """The shared contract and the serving side never import the training side, nor the demo."""
    import ast
    from pathlib import Path

    root = Path(forecaster.serve.__file__).parent.parent
    rules = {
        "model": ("forecaster.serve", "forecaster.training", "forecaster.demo"),
        "serve": ("forecaster.training", "forecaster.demo", "forecaster.evaluation"),
        "evaluation": ("forecaster.serve", "forecaster.training", "forecaster.demo"),
    }
    broken: list[str] = []
    for pkg, banned in rules.items():
        for path in (root / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names: list[str] = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                for name in names:
                    if any(name == b or name.startswith(b + ".") for b in banned):
                        broken.append(f"{path.relative_to(root)} imports {name}")
    assert not broken, "\n".join(broken)
