"""The repository's docs are self-contained: no citation of a document outside it, and
every ``docs/<file>.md#<anchor>`` a comment or doc points to is a heading of that file.

What the code relies on from TorchServe lives in ``docs/torchserve-compat.md`` and the
Celery/kombu/Redis/gunicorn facts in ``docs/design-notes.md``; a contributor who clones
the repository must be able to follow every pointer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: What is checked: the code, the tests, the scripts, the docs and the README.
SCANNED = ("control", "workers", "tests", "scripts", "bench", "examples", "infra", "docs")
#: This file names the forbidden forms; tests/data is third-party material kept verbatim.
EXCLUDED = (Path(__file__).resolve(), ROOT / "tests" / "data")
#: Build outputs and caches hold no citations of their own.
SKIPPED_DIRS = frozenset({"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"})

#: Citations of material outside the repository: the design-time reference documents by
#: name, a path into the shared folder beside the checkout, or a bare section number
#: ("§2.4") that only those documents could resolve.
OUTSIDE = re.compile(
    r"(?<![\w-])(?:torchserve|torchserve-grpc|torchserve-baseline|celery-redis-falcon"
    r"|peers-users-security|style-anchors)\.md"
    r"|\.\./shared/|shared/reference"
    r"|§\s*\d"
)
#: ``docs/name.md#anchor`` anywhere; inside docs/ also a relative ``](name.md#anchor)``.
DOC_POINTER = re.compile(r"\bdocs/([\w.-]+\.md)#([\w-]+)")
RELATIVE_LINK = re.compile(r"\]\(([\w.-]+\.md)#([\w-]+)\)")
SAME_PAGE_LINK = re.compile(r"\]\(#([\w-]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation dropped (letters,
    digits, ``_``, ``-`` and spaces kept), each space a ``-``."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading anchor of a markdown text (headings in code fences are not
    headings); repeated headings get GitHub's ``-1``, ``-2`` suffixes."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in markdown.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match is None:
            continue
        slug = github_anchor(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def scanned_files() -> Iterator[Path]:
    """Every text file under :data:`SCANNED`, and the README."""
    yield ROOT / "README.md"
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if not path.is_file() or SKIPPED_DIRS.intersection(path.parts):
                continue
            if any(path == ex or ex in path.parents for ex in EXCLUDED):
                continue
            yield path


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file (an archive, an image)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def outside_citations(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of every line citing material outside the repository."""
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]


def pointers(path: Path, text: str) -> list[tuple[int, str, str]]:
    """``(line number, doc file name, anchor)`` of every pointer into ``docs/``."""
    found = []
    in_docs = path.parent == ROOT / "docs"
    for n, line in enumerate(text.splitlines(), 1):
        found += [(n, doc, anchor) for doc, anchor in DOC_POINTER.findall(line)]
        if in_docs:
            found += [(n, doc, anchor) for doc, anchor in RELATIVE_LINK.findall(line)]
            found += [(n, path.name, anchor) for anchor in SAME_PAGE_LINK.findall(line)]
    return found


def test_nothing_cites_a_document_outside_the_repository() -> None:
    offenders = []
    for path in scanned_files():
        text = read_text(path)
        if text is None:
            continue
        for n, line in outside_citations(text):
            offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == [], "cite docs/torchserve-compat.md or docs/design-notes.md instead"


def test_every_docs_pointer_names_an_existing_heading() -> None:
    cache: dict[str, set[str] | None] = {}
    broken = []
    for path in scanned_files():
        text = read_text(path)
        if text is None:
            continue
        for n, doc, anchor in pointers(path, text):
            if doc not in cache:
                target = ROOT / "docs" / doc
                cache[doc] = (
                    anchors(target.read_text(encoding="utf-8")) if target.is_file() else None
                )
            known = cache[doc]
            if known is None or anchor not in known:
                broken.append(f"{path.relative_to(ROOT)}:{n}: docs/{doc}#{anchor}")
    assert broken == []


def test_the_compat_doc_covers_each_area_the_code_points_to() -> None:
    text = (ROOT / "docs" / "torchserve-compat.md").read_text(encoding="utf-8")
    assert {
        "management-api",
        "register",
        "scale",
        "describe",
        "inference-api",
        "batching",
        "model-archives-and-the-handler-contract",
        "worker-life-cycle-and-back-off",
        "gpu-assignment",
        "metrics",
        "configproperties-keys-honoured",
        "deviations",
    } <= anchors(text)


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Worker life cycle and back-off", "worker-life-cycle-and-back-off"),
        ("model-config.yaml", "model-configyaml"),
        ("`config.properties` keys honoured", "configproperties-keys-honoured"),
        ("One process per replica: the solo pool", "one-process-per-replica-the-solo-pool"),
        ("snake_case stays", "snake_case-stays"),
    ],
)
def test_github_anchor(heading: str, anchor: str) -> None:
    assert github_anchor(heading) == anchor


def test_anchors_skip_code_fences_and_number_repeats() -> None:
    text = "# Title\n```\n# not a heading\n```\n## Part\n## Part\n"
    assert anchors(text) == {"title", "part", "part-1"}


@pytest.mark.parametrize(
    "line",
    [
        "(``torchserve.md`` §1.4, §1.13)",
        "Choices (``celery-redis-falcon.md`` §8.4)",
        "see ../shared/reference/style-anchors.md",
        "the postman suite (shared/reference/torchserve-postman)",
        "does (§3.3).",
    ],
)
def test_outside_citations_are_recognised(line: str) -> None:
    assert outside_citations(line) == [(1, line)]


@pytest.mark.parametrize(
    "line",
    [
        "(``docs/torchserve-compat.md#batching``)",
        "see [design-notes.md](design-notes.md#liveness)",
        "TorchServe's ``ts/model_loader.py``",
    ],
)
def test_repository_pointers_are_not_outside_citations(line: str) -> None:
    assert outside_citations(line) == []


def test_pointers_found_in_code_and_in_docs() -> None:
    code = "x  # docs/torchserve-compat.md#batching and docs/design-notes.md#liveness\n"
    assert pointers(ROOT / "workers" / "x.py", code) == [
        (1, "torchserve-compat.md", "batching"),
        (1, "design-notes.md", "liveness"),
    ]
    doc = "see [b](#batching) and [l](design-notes.md#liveness)\n"
    assert pointers(ROOT / "docs" / "torchserve-compat.md", doc) == [
        (1, "design-notes.md", "liveness"),
        (1, "torchserve-compat.md", "batching"),
    ]
