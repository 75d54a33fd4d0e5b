"""The documentation holds together: the README stays short, and every relative link of the README,
benchmarks/README.md and docs/*.md leads to a file that exists and, with a `#anchor`, to a heading of it.

No network and no model: the Markdown files are read as text. Anchors follow GitHub's slug rules for headings
(lowercase; punctuation other than '-' and '_' removed; each space becomes '-'; a repeated heading gets '-1', '-2').
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 250

FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
HTML_ANCHOR = re.compile(r"""<a\s+(?:[^>]*\s)?(?:id|name)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*[\"')])?\s*\)")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)


def documents() -> list[Path]:
    """The documents whose links are checked: the README, the benchmarks' README and every page under docs/."""
    return [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines of `text` outside fenced code blocks (a fence closes on the same character, at least as long)."""
    lines, fence = [], None
    for line in text.splitlines():
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
        elif fence is not None:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence) \
                    and not line.strip().strip(fence[0]):
                fence = None
        else:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (links reduced to their text, inline markup dropped) lowercased,
    every character but letters, digits, '_', '-' and spaces removed, then each space turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in "_- ")
    return text.replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    """Every anchor a Markdown file offers: its headings' slugs (repeats numbered as GitHub numbers them) and
    explicit `<a id=...>`/`<a name=...>` anchors; fenced code is not looked at."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links_of(path: Path) -> list[str]:
    """The link targets of a Markdown file, `[text](target)` and `![alt](target)`, outside fenced code blocks and
    inline code spans (a span may run over lines, so spans are removed paragraph by paragraph)."""
    targets = []
    for paragraph in "\n".join(prose_lines(path.read_text(encoding="utf-8"))).split("\n\n"):
        targets.extend(LINK.findall(CODE_SPAN.sub("", paragraph)))
    return targets


def link_problems(document: Path) -> list[str]:
    """One message per broken relative link of `document`: a target file that does not exist, or an anchor that no
    heading of the target has. External links (http, https, mailto, ...) are not checked."""
    problems = []
    name = document.relative_to(ROOT).as_posix()
    for target in links_of(document):
        if EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (document.parent / unquote(path_part.split("?")[0])).resolve() if path_part else document
        if not resolved.is_file():
            problems.append(f"{name}: link ({target}) points to {path_part}, which does not exist "
                            f"(looked for {resolved})")
            continue
        if anchor and resolved.suffix.lower() == ".md":
            anchor = unquote(anchor).lower()
            if anchor not in anchors_of(resolved):
                where = "this document" if resolved == document else resolved.relative_to(ROOT).as_posix()
                problems.append(f"{name}: link ({target}): no heading of {where} has the anchor #{anchor}")
    return problems


def test_readme_is_short():
    """The README is what a newcomer reads first, in about five minutes: reference material belongs in docs/, so
    the README stays within README_MAX_LINES lines."""
    count = len(README.read_text(encoding="utf-8").splitlines())
    assert count <= README_MAX_LINES, (f"README.md has {count} lines, more than {README_MAX_LINES}: move reference "
                                       "material to a page under docs/ and link it")


@pytest.mark.parametrize("document", documents(), ids=lambda path: path.relative_to(ROOT).as_posix())
def test_relative_links_resolve(document):
    """Every relative link of the document leads to an existing file, and every `#anchor` to a heading of the
    target: moving or renaming a page or a section must not leave readers at a dead link."""
    assert document.is_file(), f"{document.relative_to(ROOT).as_posix()} is missing"
    problems = link_problems(document)
    assert not problems, "\n".join(problems)


def test_readme_links_every_document():
    """The README's documentation list reaches every page under docs/ and benchmarks/README.md, so no page is
    orphaned: a new page must be listed there."""
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in links_of(README)
              if not EXTERNAL.match(target) and target.partition("#")[0]}
    missing = [path.relative_to(ROOT).as_posix() for path in documents()[1:] if path.resolve() not in linked]
    assert not missing, f"README.md links none of: {missing}"


@pytest.mark.parametrize("heading, slug", [
    ("Will it fit? `pact plan`", "will-it-fit-pact-plan"),
    ("1. Safety tokens", "1-safety-tokens"),
    ("Arrow's zstd vs the `zstandard` package", "arrows-zstd-vs-the-zstandard-package"),
    ("`--top-k K` (approximate)", "--top-k-k-approximate"),
    ("bench_cache_build.py", "bench_cache_buildpy"),
    ("attack: mix, where the held-out refusals are lost", "attack-mix-where-the-held-out-refusals-are-lost"),
    ("See [the cache](cache_format.md)", "see-the-cache"),
])
def test_slugs_follow_github(heading, slug):
    """The anchor rule itself: headings of these docs slugged as GitHub slugs them, so a passing link check means
    the link works on GitHub too."""
    assert github_slug(heading) == slug


def test_checker_names_broken_links(tmp_path, monkeypatch):
    """The link check is not vacuous: a missing file, a missing anchor and a missing anchor of the same page are each
    reported, naming the document and the link, while links inside code are ignored."""
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "target.md").write_text("# Real heading\n\n```\n# not a heading\n```\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](target.md#real-heading) [file](nowhere.md) [anchor](target.md#not-a-heading)\n"
        "[self](#nope) ![figure](missing.png) [web](https://example.com/x)\n\n"
        "`[code](ignored.md)`\n\n```\n[fenced](ignored.md)\n```\n", encoding="utf-8")
    problems = link_problems(page)
    assert len(problems) == 4, problems
    assert problems[0].startswith("page.md: link (nowhere.md)") and "does not exist" in problems[0]
    assert "target.md has the anchor #not-a-heading" in problems[1]
    assert "this document has the anchor #nope" in problems[2]
    assert "missing.png" in problems[3]
