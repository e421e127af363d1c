"""What the repository ships: result files and docs that say how to reproduce a figure, not where it ran."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# an absolute path of the machine that made a file (a home, a scratch or a checkout directory)
MACHINE_PATH = re.compile(r"(?<![\w.$])/(tmp|root|home|work)/[\w.+@-]+")


def test_no_committed_result_or_doc_names_a_machine_path():
    found = []
    for path in [*(REPO / "docs").rglob("*"), REPO / "README.md"]:
        if path.is_file() and path.suffix in (".json", ".md", ".txt", ".log", ".csv"):
            for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if MACHINE_PATH.search(line):
                    found.append(f"{path.relative_to(REPO)}:{n}: {MACHINE_PATH.search(line).group(0)}")
    assert not found, "paths of the machine that made them (write repository-relative paths, or $OUT/...):\n" + "\n".join(found[:20])


def _package_imports(package_dir: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (anywhere in it, lazy imports included)."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in package_dir.glob("*.py"):
        module = path.stem
        graph[module] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                target = (node.module or "").split(".")[0]
                graph[module] |= {target} if target else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package + "."):
                graph[module].add(node.module.split(".")[len(package.split("."))])
    return {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items() if m != "__init__"}


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if t == "__init__":
                continue
            if state.get(t) == 1:
                return path + [m, t]
            if not state.get(t) and (found := visit(t, path + [m])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if not state.get(m) and (found := visit(m, [])):
            return found
    return None


def test_the_llamaindex_adapter_has_no_import_circle_and_no_private_imports():
    import ast

    package_dir = REPO / "integrations" / "llama-index-llms-picaso" / "llama_index" / "llms" / "picaso"
    assert _a_cycle(_package_imports(package_dir, "llama_index.llms.picaso")) is None
    private = []
    for path in package_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                private += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                            if a.name.startswith("_") and a.name != "__version__"]
    assert not private, private


def test_the_cycle_check_finds_a_cycle():
    assert _a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _a_cycle({"a": {"b"}, "b": set()}) is None
