"""The package's shape, as docs/layout.md states it: every import inside tokenslim/ points down the
layers, no import circle, no class over 250 lines and no function over 100 lines.

The scan reads the source (lazy imports inside functions included); it imports nothing.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tokenslim"

# docs/layout.md, "Layers": a module may import its own layer and the layers below.
LAYERS = [
    ("tokenslim.versions", "tokenslim.input_size", "tokenslim.meta", "tokenslim.ranks", "tokenslim.ops"),
    ("tokenslim.methods",),
    ("tokenslim.schedule", "tokenslim.settings_checks", "tokenslim.merge_policy"),
    ("tokenslim.reduction",),
    ("tokenslim.adapters",),
    ("tokenslim.patching", "tokenslim.spec"),
    ("tokenslim.measure", "tokenslim.evaluate", "tokenslim.loading", "tokenslim.fingerprint", "tokenslim.journal"),
    ("tokenslim.tune", "tokenslim.recover", "tokenslim.sweep", "tokenslim.export", "tokenslim.vis", "tokenslim.demo",
     "tokenslim.probe"),
    ("tokenslim.cli",),
    ("tokenslim.__main__",),
]
MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 100


def _name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in ROOT.rglob("*.py")}


def layer(module: str) -> int:
    """The layer of ``module``; the package's own ``__init__`` (the public facade) is above all."""
    if module == "tokenslim":
        return len(LAYERS)
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of docs/layout.md: add it there and to LAYERS")


def imports(module: str) -> set:
    """Modules of tokenslim that ``module`` imports (``from . import x`` counts as ``x``, not the package)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            found.update(submodules)
            if target in MODULES and len(submodules) < len(node.names):
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
    found.discard(module)
    return found


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


def test_imports_point_down_the_layers():
    upward = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
              for m in MODULES for t in imports(m)
              if layer(t) > layer(m) and not t == m.rsplit(".", 1)[0]]  # a module may read its own package
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = {m: imports(m) for m in MODULES}
    state, circles = {}, []

    def visit(module, stack):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if target == module.rsplit(".", 1)[0] and MODULES[module].name != "__init__.py":
                continue  # reading one's own package (its __init__ re-exports) is not a circle
            if state.get(target) == "open":
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not circles, "\n".join(circles)


def test_no_room_too_big_to_read():
    too_big = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                if lines > limit:
                    too_big.append(f"{module}.{node.name}: {lines} lines (limit {limit})")
    assert not too_big, "\n".join(too_big)


@pytest.mark.parametrize("source, expected", [
    ("from .ops import unmerge", {"tokenslim.ops"}),
    ("from . import spec", {"tokenslim.spec"}),
    ("from .adapters.timm_vit import MergeTrace", {"tokenslim.adapters.timm_vit"}),
])
def test_the_scan_reads_relative_imports(tmp_path, monkeypatch, source, expected):
    monkeypatch.setitem(MODULES, "tokenslim", tmp_path / "__init__.py")
    (tmp_path / "__init__.py").write_text(source + "\n")
    assert imports("tokenslim") == expected
