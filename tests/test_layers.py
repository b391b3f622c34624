"""The package's layers import only downwards: core < describe < models < data < training < evaluation
< heads < methods < reports < the entry points (main, aot, sweep, report, the tokenizer alias). Every import
statement of every module is read, at any depth (function-level imports included)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxgist"
LAYERS = ("core", "describe", "models", "data", "training", "evaluation", "heads", "methods", "reports")
TOP = len(LAYERS)  # modules directly in jaxgist/: the entry points


def layer_of(module: str) -> int:
    """Layer index of a dotted jaxgist module name."""
    parts = module.split(".")
    assert parts[0] == "jaxgist", module
    if len(parts) == 1:
        return TOP
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else TOP


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every jaxgist import in ``path``; ``from jaxgist import x`` names x."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "jaxgist"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "jaxgist":
                found += [(node.lineno, f"jaxgist.{a.name}") for a in node.names]
            elif node.module.split(".")[0] == "jaxgist":
                found.append((node.lineno, node.module))
    return found


def module_name(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def upward_imports(root: pathlib.Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        here = layer_of(module_name(path, root))
        for line, target in imported_modules(path):
            if layer_of(target) > here:
                problems.append(f"{path.relative_to(root.parent)}:{line} ({LAYERS[here] if here < TOP else 'top'}) "
                                f"imports {target} ({LAYERS[layer_of(target)] if layer_of(target) < TOP else 'top'})")
    return problems


def test_every_layer_imports_only_from_the_layers_below():
    assert upward_imports() == []


def test_the_checker_finds_an_upward_import(tmp_path):
    pkg = tmp_path / "jaxgist"
    (pkg / "training").mkdir(parents=True)
    (pkg / "training" / "loop.py").write_text("def f():\n    from jaxgist.methods import gist\n")
    (pkg / "core").mkdir()
    (pkg / "core" / "arrays.py").write_text("from jaxgist import heads\nfrom jaxgist.core import files\n")
    found = upward_imports(pkg)
    assert len(found) == 2 and "loop.py:2" in found[1] and "jaxgist.heads" in found[0], found


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_is_a_package(layer):
    assert (PACKAGE / layer / "__init__.py").is_file()
