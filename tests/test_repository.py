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


def _documented_commands() -> list[tuple[str, str, str]]:
    """(doc file, the script or command named, the rest of the line) of every command the docs show."""
    pattern = re.compile(r"(?:\.venv/bin/)?(python3? -m [\w.]+(?: \w+)?|python3? [\w/.-]+\.py|picaso-rag (?:serve|ingest))((?: [^`|\n]*)?)")
    found = []
    for path in [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "integrations").glob("*/README.md")]:
        for line in path.read_text(encoding="utf-8").splitlines():
            for match in pattern.finditer(line):
                found.append((path.relative_to(REPO).as_posix(), match.group(1), match.group(2)))
    return found


def _sources_of(command: str) -> list[Path] | None:
    """The files that define what ``command`` accepts (None: not this repository's, e.g. pytest)."""
    if command.startswith("picaso-rag"):
        return [REPO / "integrations/picaso-server/picaso_server/cli.py", REPO / "integrations/picaso-server/picaso_server/ingest.py"]
    parts = command.split()
    if parts[1] == "-m":
        if not parts[2].startswith("picaso_rag"):
            return None
        package = REPO / parts[2].replace(".", "/")
        return sorted(package.glob("*.py")) if package.is_dir() else [package.with_suffix(".py")]
    return [REPO / parts[1]]


def test_every_command_the_docs_show_exists_with_the_options_they_give_it():
    """A script named in README.md or docs/ exists, and each --option the same line passes it is one it defines."""
    problems, checked = [], 0
    for doc, command, rest in _documented_commands():
        sources = _sources_of(command)
        if sources is None:
            continue
        missing = [s for s in sources if not s.is_file()]
        if missing:
            problems.append(f"{doc}: {command}: no {missing[0].relative_to(REPO)}")
            continue
        defined = "".join(s.read_text(encoding="utf-8") for s in sources)
        for option in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
            checked += 1
            if f'"{option}"' not in defined and f"'{option}'" not in defined:
                problems.append(f"{doc}: {command} {option}: not an option of {sources[0].relative_to(REPO)}")
    assert checked > 50, checked  # the docs do show commands: a pattern that finds none would pass vacuously
    assert not problems, "\n".join(problems)
