"""The package's modules import each other one way: no cycle, and no import inside a function."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "marginfused"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> tuple[set[str], list[str]]:
    """(the package modules imported at module level, imports found inside functions)."""
    tree = ast.parse(path.read_text())
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            inside_function = any(
                isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node in ast.walk(parent) for parent in ast.walk(tree)
            )
            if inside_function:
                nested.append(f"{name}: from {'.' * node.level}{node.module or ''} import ...")
            else:
                found.add(target)
    return found, nested


def test_no_cycle_and_no_function_level_package_import():
    graph, nested = {}, []
    for path in PACKAGE.rglob("*.py"):
        targets, inner = imports(path)
        graph[module_name(path)] = {t for t in targets if t.startswith("marginfused")}
        nested += [line for line in inner if "kernels" not in line]
    assert not nested, f"imports inside functions: {nested}"

    visiting, done = set(), set()

    def visit(module, trail):
        if module in done:
            return
        assert module not in visiting, f"import cycle: {' -> '.join(trail + [module])}"
        visiting.add(module)
        for target in graph.get(module, ()):
            # importing a submodule runs its package's __init__ first, which is not a cycle
            if not module.startswith(target + "."):
                visit(target, trail + [module])
        visiting.discard(module)
        done.add(module)

    for module in graph:
        visit(module, [])
