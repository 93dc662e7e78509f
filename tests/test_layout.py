"""The package's shape: no import circles (imports inside functions count), and the collectives
know nothing of training."""
import ast
from pathlib import Path

import nblib

PACKAGE = Path(nblib.__file__).parent


def imports_of(module: str) -> set[str]:
    """The nblib modules `module` imports, anywhere in its file."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nblib"):
            found |= {node.module.split(".")[1]} if "." in node.module else {a.name for a in node.names}
    return found & set(nblib.__all__)


def test_no_module_imports_itself_through_others():
    graph = {m: imports_of(m) for m in nblib.__all__}

    def reaches(start: str, target: str, seen: set) -> bool:
        return any(n == target or (n not in seen and not seen.add(n) and reaches(n, target, seen))
                   for n in graph[start])

    assert [m for m in graph if reaches(m, m, set())] == []


def test_the_collectives_import_no_training_code():
    assert imports_of("collectives") <= {"config", "hardware"}


def test_the_readmes_module_table_names_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("| module | purpose |"):]
    assert [m for m in nblib.__all__ if f"`{m}`" not in table] == []
