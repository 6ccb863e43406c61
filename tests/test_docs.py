"""The README stays short, keeps CI's set-up commands, links every docs page, and no relative link is broken."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(page: Path) -> list[str]:
    targets = (target.split("#")[0] for target in LINK.findall(page.read_text(encoding="utf-8")))
    return [t for t in targets if t and not t.startswith(("http://", "https://", "mailto:"))]


def test_readme_is_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 220


def test_readme_keeps_the_set_up_commands_ci_runs():
    text = README.read_text(encoding="utf-8")
    assert "pip install -e . && python -m sweep\n" in text
    assert 'pip install -e ".[test]" && python -m pytest -q\n' in text


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert not broken, f"{page.name} links to missing files: {broken}"


def test_readme_links_every_docs_page():
    linked = {(ROOT / t).resolve() for t in relative_links(README)}
    assert [p.name for p in PAGES if p.resolve() not in linked] == []
