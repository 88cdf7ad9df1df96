"""Every file the repository's code and docs point at is in the repository (issue 14: a reader can follow them).

Checked: paths under the repository's top-level folders written in any tracked text file (`daemon/live/engine.py`,
`docs/training.md`, `bench/soak.py`…), relative links in Markdown files, and no reference to design notes kept
outside the repository.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOP = ("core", "daemon", "train", "export", "tests", "bench", "docs", "contrib", "models", "harness", ".ci")
PATH_REF = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(t) for t in TOP) + r")/[\w./-]*\w)")
MD_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
TEXT_SUFFIXES = (".py", ".md", ".toml", ".1", ".service", ".in", ".cfg", ".txt")
# Written in pieces, so that this file does not name them itself (it is checked like every other file).
OUTSIDE = ("DESIGN" + ".md", "STYLE" + ".md", ".." + "/shared")


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / f for f in out.split() if f.endswith(TEXT_SUFFIXES) or Path(f).name in ("Makefile", "run")]


def missing_path_refs(text: str, root: Path = REPO) -> set[str]:
    """The repository paths named in `text` that do not exist under `root`."""
    missing = set()
    for m in PATH_REF.finditer(text):
        ref = m.group(1).rstrip(".")
        if "*" in ref:  # a pattern, not a file
            continue
        if not (root / ref).exists():
            missing.add(ref)
    return missing


def test_the_checker_finds_a_missing_path(tmp_path):
    (tmp_path / "daemon").mkdir()
    (tmp_path / "daemon" / "here.py").write_text("")
    here, gone = "daemon" + "/here.py", "daemon" + "/gone.py"  # split, so this file names no missing path itself
    assert missing_path_refs(f"see {here} and {gone}, not my{gone}", tmp_path) == {gone}


def test_every_path_named_in_code_and_docs_exists():
    bad = {}
    for f in tracked_text_files():
        refs = missing_path_refs(f.read_text(errors="replace"))
        if refs:
            bad[str(f.relative_to(REPO))] = sorted(refs)
    assert not bad, f"paths that are not in the repository: {bad}"


def test_markdown_links_resolve():
    bad = []
    for f in tracked_text_files():
        if f.suffix != ".md":
            continue
        for m in MD_LINK.finditer(f.read_text()):
            target = m.group(1)
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (f.parent / target).exists():
                bad.append(f"{f.relative_to(REPO)}: {target}")
    assert not bad, f"links to files that are not in the repository: {bad}"


def test_no_reference_to_design_notes_outside_the_repository():
    bad = [f"{f.relative_to(REPO)}: {name}" for f in tracked_text_files()
           for name in OUTSIDE if name in f.read_text(errors="replace")]
    assert not bad, f"references to files outside the repository: {bad}"
