"""The package's shape: no import cycles, serving never imports training, small modules.

A static check over the source (ast), so it sees imports inside functions too and needs no heavy
library: every `import qlora.x` / `from qlora.x import y` is an edge. Module-level edges must form
no cycle (`qlora/__init__.py` re-exports lazily, so it adds none); no edge at any level may lead
from serving or evaluation code (`qlora.inference`, `qlora.hf`, `qlora.adapters`, `qlora.reports`,
the eval / generate / merge / quantize commands) into `qlora.training`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "qlora"
SERVING = ("qlora.inference", "qlora.hf", "qlora.adapters", "qlora.reports", "qlora.commands.eval",
           "qlora.commands.generate", "qlora.commands.merge", "qlora.commands.quantize", "qlora.nn", "qlora.quant",
           "qlora.gguf", "qlora.commands.export")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def resolve(name: str) -> str:
    """The module an imported name lives in (`qlora.nn.Linear4bit` -> `qlora.nn`)."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` imports nothing at run time
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("qlora")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qlora"):
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {resolve(n) for n in found} - ({module_name(path)} if path.is_relative_to(ROOT) else set())


def test_no_import_cycle():
    graph = {m: imports(p, top_level_only=True) for m, p in MODULES.items()}
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            pytest.fail("import cycle: " + " -> ".join(stack[stack.index(module):] + [module]))
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            visit(dep, stack + [module])
        done.add(module)

    for module in graph:
        visit(module, [])


def test_serving_code_never_imports_training():
    offenders = {m: sorted(d for d in imports(p, top_level_only=False) if d.startswith("qlora.training"))
                 for m, p in MODULES.items() if m.startswith(SERVING)}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_modules_are_small():
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert {m: n for m, n in sizes.items() if n >= MAX_LINES} == {}


def test_the_checker_sees_a_cycle(tmp_path):
    """The cycle check can fail: two modules importing each other are reported."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from qlora.hf.files import SAFE_WEIGHTS\nimport qlora.io\n")
    assert imports(a, top_level_only=True) == {"qlora.hf.files", "qlora.io"}
    b.write_text("def f():\n    from qlora.training.loop import train\n")
    assert imports(b, top_level_only=True) == set() and imports(b, top_level_only=False) == {"qlora.training.loop"}
