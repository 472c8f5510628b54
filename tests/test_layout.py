"""Dependencies point one way: pipelines/ and stats/ import giblet/; giblet/ imports neither."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_giblet_never_imports_pipelines_or_stats():
    files = sorted((ROOT / "giblet").rglob("*.py"))
    assert len(files) > 5
    for f in files:
        bad = imported_roots(f) & {"pipelines", "stats", "tests", "benchmarks"}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_importing_giblet_starts_no_dask_client():
    import subprocess
    import sys

    code = ("import giblet, giblet.synth, giblet.features.fmri, sys; "
            "import distributed; from distributed.client import _get_global_client as g; "
            "sys.exit(g() is not None)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _module_graph() -> dict[str, set[str]]:
    """Every project module -> the project modules it imports anywhere (lazy imports included)."""
    mods = {}
    for pkg in ("giblet", "pipelines", "stats"):
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    graph = {}
    for name, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {d for d in deps if d in mods and d != name and not name.startswith(d + ".")}
    return graph


def test_no_import_cycles_between_project_modules():
    """A module never reaches itself through its imports (lazy ones included): the stage modules
    and their list, DDP and ZeRO-1, used to import each other."""
    graph = _module_graph()
    assert "pipelines.stages" in graph and "giblet.training.zero" in graph

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    cycles = sorted(m for m in graph if m in reach(m))
    assert not cycles, f"modules in an import cycle: {cycles}"
