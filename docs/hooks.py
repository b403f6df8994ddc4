"""MkDocs hooks (mkdocs.yml ``hooks:``; not a page of the site): the Markdown files at the repository root
(README.md, the home page, and EXPERIMENTS.md, BENCHMARKS.md, RELIABILITY.md, CHANGELOG.md) join the site beside
docs/, and relative links, written as they work on GitHub, are rewritten to where the pages lie in the site.

On GitHub a root file links ``docs/guide/maps.md`` and a page under docs/ links ``../../EXPERIMENTS.md``; in the
site docs/ is the top and the root files sit in it. So a link is resolved against the page's place in the
repository, then made relative to the page's place in the site.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT_PAGES = ("README.md", "EXPERIMENTS.md", "BENCHMARKS.md", "RELIABILITY.md", "CHANGELOG.md")
LINK = re.compile(r"(\]\()([^)\s#]+)((?:#[^)\s]*)?\))")


def on_files(files, config):
    root = Path(config["config_file_path"]).parent
    for name in ROOT_PAGES:
        files.append(File(name, str(root), config["site_dir"], config["use_directory_urls"]))
    return files


def repo_path(src_uri: str) -> str:
    """Where a page of the site lies in the repository."""
    return src_uri if src_uri in ROOT_PAGES else "docs/" + src_uri


def site_path(path: str) -> str | None:
    """Where a file of the repository lies in the site (None: not in the site)."""
    if path in ROOT_PAGES:
        return path
    if path.startswith("docs/"):
        return path[len("docs/"):]
    return None


def parameter_table(root: Path) -> str:
    """The parameter table of ``GaussianAD`` as Markdown, from ``gaussad.detector.params.PARAMS`` (the source of the
    Parameters section that ``GaussianAD.__doc__`` gets at import, which the API reference's static reading of the
    source cannot see)."""
    import sys

    sys.path.insert(0, str(root / "src"))
    try:
        from gaussad.detector import params
    finally:
        sys.path.pop(0)
    rows = ["| parameter | default | meaning |", "|---|---|---|"]
    for p in params.PARAMS:
        default = "the preset's" if p.preset else f"`{p.default!r}`"
        meaning = p.help + ("" if p.stored else " (not stored in model files)")
        rows.append(f"| `{p.name}` | {default} | {meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files):
    src = page.file.src_uri
    if "<!-- gaussad-parameters -->" in markdown:
        markdown = markdown.replace("<!-- gaussad-parameters -->",
                                    parameter_table(Path(config["config_file_path"]).parent))
    here = posixpath.dirname(repo_path(src))

    def rewrite(m: re.Match) -> str:
        target = m.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            return m.group(0)
        in_site = site_path(posixpath.normpath(posixpath.join(here, target)))
        if in_site is None:
            return m.group(0)
        return m.group(1) + posixpath.relpath(in_site, posixpath.dirname(src) or ".") + m.group(3)

    return LINK.sub(rewrite, markdown)


SPHINX_ROLE = re.compile(r":(?:func|meth|class|mod|attr|data|exc|obj|const):(<code>)")


def on_page_content(html, page, config, files):
    """The docstrings are reST-flavoured (``:func:`name```); the API reference shows the name alone, as code."""
    return SPHINX_ROLE.sub(r"\1", html)
