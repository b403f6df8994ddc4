"""The documents a newcomer navigates (issue 31): README's contents list every section, and every link between the
Markdown documents names a heading that exists, as GitHub spells its anchor."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "EXPERIMENTS.md", "BENCHMARKS.md", "RELIABILITY.md")


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation other than hyphens and underscores dropped,
    spaces made hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every ATX heading outside code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{1,6}) (.+)", line)):
            out.append((len(m.group(1)), m.group(2)))
    return out


def test_anchor_spells_github_slugs():
    assert anchor("Issue 30: the fused score's decision, at an input size") == \
        "issue-30-the-fused-scores-decision-at-an-input-size"
    assert anchor("gaussad tune: settings (issue 14, items 4 and 1)") == "gaussad-tune-settings-issue-14-items-4-and-1"
    assert anchor("`evaluate` on the model's own fused path") == "evaluate-on-the-models-own-fused-path"


def test_readme_contents_list_every_section_in_order():
    text = (ROOT / "README.md").read_text()
    contents = text[text.index("## Contents"):]
    contents = contents[:contents.index("\n## ", 1)]
    listed = re.findall(r"^- \[([^\]]+)\]\(#([^)]+)\)", contents, re.M)
    sections = [title for level, title in headings(text) if level == 2 and title != "Contents"]
    assert [title for title, _ in listed] == sections
    assert all(target == anchor(title) for title, target in listed)


@pytest.mark.parametrize("name", DOCS)
def test_every_link_between_the_documents_finds_its_heading(name):
    text = (ROOT / name).read_text()
    broken = []
    for doc, target in re.findall(r"\]\(((?:[A-Z]+\.md)?)#([^)\s]+)\)", text):
        anchors = {anchor(t) for _, t in headings((ROOT / (doc or name)).read_text())}
        if target not in anchors:
            broken.append(f"{doc or name}#{target}")
    assert not broken
