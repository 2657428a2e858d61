"""docs/architecture.md, the map, against the code: the sample path's count it states is the count
of the files it lists (its own `wc -l` command), and its Folders table names every module of the
four layers."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()
LAYERS = ("psm_model", "pipelines", "jobs", "benchmarks")


def _section(title: str) -> str:
    start = DOC.index(f"\n## {title}")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end != -1 else None]


def test_the_sample_path_count_is_what_its_command_measures():
    section = _section("One sample, JSON to loss")
    (command,) = re.findall(r"^wc -l [^\n]+$", section, re.M)  # one command, in its sh block
    files = command.split()[2:]
    stated = re.search(r"(\d+) files, ([\d,]+) lines", section[section.index(command) :])
    assert stated, "no 'N files, N lines' after the command"
    assert int(stated[1]) == len(files) == len(set(files))
    # the doc's own command, run as a reader would: its total is the figure stated
    out = subprocess.run(command.split(), cwd=ROOT, capture_output=True, text=True, check=True)
    total = int(out.stdout.splitlines()[-1].split()[0])  # wc's "N total" line
    assert int(stated[2].replace(",", "")) == total, (
        f"docs/architecture.md states {stated[2]} lines; `{command}` counts {total:,}"
    )


def test_the_folders_table_names_every_module():
    rows = {
        layer: next(line for line in DOC.splitlines() if line.startswith(f"| `{layer}/` |"))
        for layer in LAYERS
    }
    missing = [
        f"{layer}/{path.name}"
        for layer in LAYERS
        for path in sorted((ROOT / layer).glob("*.py"))
        if path.name != "__init__.py" and f"`{path.name}`" not in rows[layer]
    ]
    assert not missing, f"not in docs/architecture.md's Folders table: {', '.join(missing)}"
