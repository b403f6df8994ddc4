"""The documents a newcomer navigates (issue 31): README stays short and its contents list every section, EXPERIMENTS.md
and BENCHMARKS.md open with a contents list of every section, every link between the Markdown documents (the root
files and docs/) finds its file and, when it names one, a heading that exists, as GitHub spells its anchor; and the
MkDocs site builds with --strict (where mkdocs is installed)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOT_DOCS = ("README.md", "EXPERIMENTS.md", "BENCHMARKS.md", "RELIABILITY.md", "CHANGELOG.md")
DOCS = sorted([*ROOT_DOCS, *(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))])
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation other than hyphens and underscores dropped,
    spaces made hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def outside_code(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return out


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every ATX heading outside code blocks."""
    return [(len(m.group(1)), m.group(2)) for line in outside_code(text) if (m := re.match(r"(#{1,6}) (.+)", line))]


def test_anchor_spells_github_slugs():
    assert anchor("Issue 30: the fused score's decision, at an input size") == \
        "issue-30-the-fused-scores-decision-at-an-input-size"
    assert anchor("gaussad tune: settings (issue 14, items 4 and 1)") == "gaussad-tune-settings-issue-14-items-4-and-1"
    assert anchor("`evaluate` on the model's own fused path") == "evaluate-on-the-models-own-fused-path"


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("name", ["README.md", "EXPERIMENTS.md", "BENCHMARKS.md"])
def test_contents_list_every_section_in_order(name):
    text = (ROOT / name).read_text()
    contents = text[text.index("## Contents"):]
    contents = contents[:contents.index("\n## ", 1)]
    listed = re.findall(r"^- \[(.+)\]\(#([^)]+)\)$", contents, re.M)
    sections = [title for level, title in headings(text) if level == 2 and title != "Contents"]
    assert [title for title, _ in listed] == sections
    assert all(target == anchor(title) for title, target in listed)


def test_every_docs_page_is_listed():
    """Every page under docs/ is reachable: README links the guide, and mkdocs.yml's nav names every page (the
    pictures' note, docs/images/README.md, apart)."""
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS:
        if page.startswith("docs/") and page != "docs/images/README.md":
            assert page[len("docs/"):] in nav, page


@pytest.mark.parametrize("name", DOCS)
def test_every_link_between_the_documents_finds_its_file_and_heading(name):
    path = ROOT / name
    broken = []
    for target in LINK.findall("\n".join(outside_code(path.read_text()))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, fragment = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.is_file():
            broken.append(f"{target} (no such file)")
        elif fragment and linked.suffix == ".md":
            if fragment not in {anchor(t) for _, t in headings(linked.read_text())}:
                broken.append(f"{target} (no such heading)")
    assert not broken


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (the docs extra)")
def test_the_site_builds_strictly(tmp_path):
    """`make docs`: a broken link or anchor, a page left out of the nav or a docstring the API reference warns
    about fails the build."""
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
