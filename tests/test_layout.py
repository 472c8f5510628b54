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
