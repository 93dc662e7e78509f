"""The package's shape: folders by the notebook's stages, no import circles (imports inside
functions count), the collectives know nothing of training, and the README's map is the tree."""
import ast
from pathlib import Path

import nblib

PACKAGE = Path(nblib.__file__).parent
STAGES = {"setup", "data", "model", "training", "evaluation", "export", "monitoring"}


def modules() -> dict[str, Path]:
    """Every module by dotted name under nblib ("training.loop"); a package's __init__ by the package's."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    found.pop("", None)
    return found


def imports_of(module: str) -> set[str]:
    """The nblib modules `module` imports, anywhere in its file (a package's name stands for its __init__)."""
    known = modules()
    found = set()
    for node in ast.walk(ast.parse(known[module].read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nblib"):
            base = node.module.removeprefix("nblib").lstrip(".")
            for alias in node.names:
                name = f"{base}.{alias.name}".lstrip(".")
                found.add(name if name in known else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("nblib.") for a in node.names if a.name.startswith("nblib.")}
        assert not (isinstance(node, ast.ImportFrom) and node.level), f"{module}: a relative import"
    return {m for m in found if m in known} - {module}


def test_the_folders_are_the_notebooks_stages_and_no_module_is_over_320_lines():
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} == STAGES
    lengths = {m: len(p.read_text().splitlines()) for m, p in modules().items()}
    assert [m for m, n in lengths.items() if n > 320] == []


def test_no_module_imports_itself_through_others():
    graph = {m: imports_of(m) for m in modules()}

    def reaches(start: str, target: str, seen: set) -> bool:
        return any(n == target or (n not in seen and not seen.add(n) and reaches(n, target, seen))
                   for n in graph[start])

    assert [m for m in graph if reaches(m, m, set())] == []


def test_the_collectives_import_no_training_code():
    assert imports_of("training.collectives") <= {"setup.config", "setup.hardware"}


def test_the_readmes_map_is_the_tree():
    readme = (PACKAGE.parent / "README.md").read_text()
    tree = readme[readme.index("```text\nnblib/"):]
    tree = tree[:tree.index("```\n", 4)]
    shown = {line.split()[0].strip("/").removesuffix(".py") for line in tree.splitlines()[2:] if line.strip()}
    files = {path.relative_to(PACKAGE).with_suffix("").as_posix().split("/")[-1]
             for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    assert shown == files | STAGES
