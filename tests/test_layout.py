"""The repository's shape: each layer imports only the layers below it, names are imported from the module that
defines them (no re-exports), and no file outside tests and benchmarks grows past 400 lines."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The floor of each package; the stage scripts at the root stand above them all.
FLOORS = {"utils": 0, "models": 1, "modules": 1, "loader": 2, "engine": 3}
TOP = max(FLOORS.values()) + 1
MAX_LINES = 400


def project_files():
    """Every Python file of the project outside tests, benchmarks, hidden folders (.venv) and mutmut's copy."""
    skipped = {"tests", "benchmarks", "scripts", "docs", "mutants"}

    def kept(path):
        folders = path.relative_to(ROOT).parts[:-1]
        return not skipped & set(folders) and not any(folder.startswith(".") for folder in folders)

    return sorted(filter(kept, ROOT.rglob("*.py")))


def module_name(path):
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def floor(module):
    return FLOORS.get(module.split(".")[0], TOP)


def project_imports(path):
    """``(line, module, names)`` of every import of a project module in ``path`` (names: None for ``import m``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in FLOORS:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] in FLOORS]
    return found


def defined_names(path):
    """The names a module binds itself (functions, classes, assignments), not those it imports."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        for sub in ast.walk(node) if isinstance(node, (ast.Assign, ast.AnnAssign, ast.If, ast.Try)) else ():
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                names.add(sub.id)
            elif isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                names.add(sub.name)
    return names


def test_the_walk_sees_every_layer():
    modules = {module_name(p) for p in project_files()}
    assert {"utils.errors", "models.backbone", "modules.objectives", "loader.datasets", "engine.loop"} <= modules
    assert {"train_front_door", "test", "hubconf"} <= modules
    assert not any(m.startswith(("tests.", "benchmarks.")) for m in modules)


def test_no_import_runs_back_up():
    upward = [
        f"{module_name(path)}:{line} imports {target}"
        for path in project_files()
        for line, target, _ in project_imports(path)
        if floor(target) > floor(module_name(path))
    ]
    assert not upward, "\n".join(upward)


def test_utils_imports_nothing_of_the_project_but_utils():
    for path in project_files():
        if module_name(path).startswith("utils."):
            assert {t.split(".")[0] for _, t, _ in project_imports(path)} <= {"utils"}, path


def test_no_import_circle():
    modules = {module_name(p): p for p in project_files()}
    graph = {m: {t for _, t, _ in project_imports(p) if t in modules and t != m} for m, p in modules.items()}
    done, path = set(), []

    def visit(module):
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        path.append(module)
        circle = next(filter(None, map(visit, sorted(graph[module]))), None)
        path.pop()
        done.add(module)
        return circle

    circles = list(filter(None, map(visit, sorted(graph))))
    assert not circles, " -> ".join(circles[0])


@pytest.mark.parametrize("source", ["from engine.loop import fit\n", "import loader.datasets\n"])
def test_an_upward_import_is_seen(tmp_path, source):
    path = tmp_path / "probe.py"
    path.write_text(source)
    (target,) = [t for _, t, _ in project_imports(path)]
    assert floor(target) > floor("modules.objectives")


def test_names_come_from_the_module_that_defines_them():
    files = {module_name(p): p for p in project_files() + sorted((ROOT / "tests").glob("*.py"))}
    defined = {name: defined_names(path) for name, path in files.items()}
    borrowed = [
        f"{module_name(path)}:{line} takes {name} from {target}, which only imports it"
        for path in files.values()
        for line, target, names in project_imports(path)
        if names and target in defined
        for name in names
        if name not in defined[target] and f"{target}.{name}" not in files
    ]
    assert not borrowed, "\n".join(borrowed)


def test_no_file_outgrows_400_lines():
    long = {module_name(p): n for p in project_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_one_stage2_step_reads_in_six_files():
    """The training loop of stage 2 enters at most 6 files and about 700 lines of the script, loop and method."""
    script = ROOT / "benchmarks" / "step_path.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=True)
    loop = out.stdout.split("### ")[1]
    assert "`modules/objectives.py`" in loop and "`engine/loop.py`" in loop and "front_door_step" in loop
    files, lines = map(int, re.search(r"the method: (\d+) files, (\d+) lines", loop).groups())
    assert files <= 6 and 300 <= lines <= 700, (files, lines)
