"""The package's modules import each other one way: no cycle, no package import inside a
function (kernels/ is part of the package, installed as marginfused.kernels), and nothing but
marginfused.compat itself imports marginfused.compat."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"marginfused": ROOT / "marginfused", "marginfused.kernels": ROOT / "kernels"}


def modules():
    """(module name, path) of every module of the installed package."""
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join([package, *parts[:-1]] + ([] if parts[-1] == "__init__" else [parts[-1]]))
            yield name, path


def package_imports(name: str, path: Path) -> tuple[set[str], list[str]]:
    """(the package modules `name` imports at module level, the package imports inside functions)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    inside_functions = {
        id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
    }
    found, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            source = f"{base}.{node.module}" if node.module else base
            targets = [source] + [f"{source}.{alias.name}" for alias in node.names]  # a name may be a module
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
            targets = [n for n in names if n and n.startswith("marginfused")]
        else:
            continue
        if id(node) in inside_functions:
            nested += [f"{name} imports {t} inside a function" for t in targets]
        else:
            found.update(targets)
    return found, nested


def test_no_cycle_and_no_function_level_package_import():
    known = dict(modules())
    graph, nested = {}, []
    for name, path in known.items():
        targets, inner = package_imports(name, path)
        graph[name] = {t for t in targets if t in known}
        nested += inner
    # The Triton kernels are imported on first use, so that `import marginfused` works where
    # Triton (an optional dependency) is not installed: the one kind of function-level import.
    lazy_triton = [line for line in nested if " imports marginfused.kernels" in line]
    assert nested == lazy_triton, sorted(set(nested) - set(lazy_triton))

    visiting, done = set(), set()

    def visit(module, trail):
        if module in done:
            return
        assert module not in visiting, f"import cycle: {' -> '.join(trail + [module])}"
        visiting.add(module)
        for target in graph.get(module, ()):
            if not module.startswith(target + "."):  # a submodule's package __init__ runs first
                visit(target, trail + [module])
        visiting.discard(module)
        done.add(module)

    for module in graph:
        visit(module, [])


def test_nothing_in_the_package_imports_compat():
    """marginfused.compat (loaders of other libraries' checkpoints) builds on the package; the
    package never imports it."""
    importers = [
        name for name, path in modules()
        if not name.startswith("marginfused.compat")
        and any(target.startswith("marginfused.compat") for target in package_imports(name, path)[0])
    ]
    assert not importers, importers
