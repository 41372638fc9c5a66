"""The package's import structure: no cycles, stages import only what lies below them.

Read from the source with ``ast``, so the test sees every import, including ones inside
functions, without importing anything.
"""

import ast
from pathlib import Path

import lmforge

ROOT = Path(lmforge.__file__).parent
# Bottom to top. A library module may import its own stage and the stages below it.
LAYERS = [
    {"errors", "config", "rundir", "progress", "__init__"},
    {"data"},
    {"tokenizer"},
    {"model"},
    {"cost"},
    {"train"},
    {"scaling", "export"},
    {"post"},
    {"eval"},
    {"serve"},
    {"route", "knowledge"},
]
# Orchestration may import any stage: the CLI, the pipeline, experiments.
ORCHESTRATION = {"lmforge.cli", "lmforge.__main__", "lmforge.pipeline", "lmforge.scaling.experiment"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def resolve(name: str) -> str:
    """The module an import names: the submodule when it is one, else its package."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported lmforge module, line, inside a function) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    local = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local |= {id(sub) for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmforge"):
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("lmforge")]
        out += [(resolve(n), node.lineno, id(node) in local) for n in names]
    return out


GRAPH = {m: sorted({t for t, _, _ in imports_of(p) if t != m}) for m, p in MODULES.items()}


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(module: str) -> int | None:
    stage = stage_of(module)
    return next((i for i, group in enumerate(LAYERS) if stage in group), None)


def is_orchestration(module: str) -> bool:
    return module in ORCHESTRATION or module.endswith(".cli")


def find_cycle(graph: dict) -> list[str] | None:
    """One import cycle, as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_stage_has_a_layer():
    missing = sorted(m for m in MODULES if not is_orchestration(m) and layer_of(m) is None)
    assert not missing, f"add these stages to LAYERS: {missing}"


def test_libraries_import_only_their_stage_and_lower_ones():
    bad = []
    for m, targets in GRAPH.items():
        if is_orchestration(m):
            continue
        for t in targets:
            if stage_of(t) != stage_of(m) and (is_orchestration(t) or layer_of(t) > layer_of(m)):
                bad.append(f"{m} imports {t}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_lmforge_modules_are_imported_at_the_top():
    """Function-local imports of lmforge's own modules hide the dependency graph (and cycles)."""
    local = [f"{m}:{line} imports {t}" for m, p in MODULES.items() for t, line, inside in imports_of(p) if inside]
    assert not local, "\n".join(local)
