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
