"""The documentation's references resolve: every relative link (and its #anchor, in a Markdown
file) and every backticked repository path in README.md and docs/*.md names something that
exists in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP_DIRS = ("engine/", "conversions/", "tests/", "docs/", "bench/", "Formula/", "launchd/")
TOP_DIRS += ("requirements/", ".ci/")
TOP_FILES = ("Makefile", "pyproject.toml", "README.md")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
NOT_A_PATH = re.compile(r"[\s*?\[\]<>{}$~|]")  # spaces, wildcards, placeholders


def prose(path: Path) -> str:
    """The Markdown outside fenced code blocks."""
    return FENCE.sub("", path.read_text())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#+\s+(.+)$", prose(path), re.M)
    return {slug(heading) for heading in headings}


def relative_links(path: Path) -> list[str]:
    targets = LINK.findall(prose(path))
    external = ("http://", "https://", "mailto:", "#")
    return [target for target in targets if not target.startswith(external)]


def repository_paths(path: Path) -> list[str]:
    """Backticked tokens that name a file or folder of this repository."""
    tokens = CODE.findall(prose(path))
    return [
        token
        for token in tokens
        if not NOT_A_PATH.search(token) and (token in TOP_FILES or token.startswith(TOP_DIRS))
    ]


def broken_link(source: Path, target: str) -> str | None:
    file_part, _, anchor = target.partition("#")
    resolved = (source.parent / file_part).resolve()
    if not resolved.exists():
        return f"{target}: no such file"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"{target}: no heading #{anchor} in {resolved.name}"
    return None


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    problems = [broken_link(doc, target) for target in relative_links(doc)]
    assert [p for p in problems if p] == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_backticked_repository_paths_exist(doc: Path) -> None:
    missing = [token for token in repository_paths(doc) if not (ROOT / token).exists()]
    assert missing == []


def test_the_checks_see_what_they_check(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# A heading\n[d](docs/design.md#layout) [w](https://x.org) [a](#a-heading)\n"
        "`engine/chat/batch.py` `engine/*.py` `engine.cli` `tests/<name>.py` `Makefile`\n"
        "```sh\n`bench/none.py` [x](nowhere.md)\n```\n"
    )
    assert relative_links(doc) == ["docs/design.md#layout"]
    assert repository_paths(doc) == ["engine/chat/batch.py", "Makefile"]
    assert anchors(doc) == {"a-heading"}
    assert slug("Chat: continuous batching") == "chat-continuous-batching"
    assert broken_link(ROOT / "README.md", "docs/design.md#layout") is None
    assert broken_link(ROOT / "README.md", "docs/design.md#nowhere") is not None
    assert "docs/design.md" in relative_links(ROOT / "README.md")
