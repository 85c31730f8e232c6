"""The rendered book's HTML as text (no browser needed; run with `make check-html` after `make
book`): no page shows the build machine's paths, a warning, a progress bar or a Markdown table left
as text."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "book" / "_build" / "html"
PAGES = sorted(p for p in HTML.rglob("*.html") if not any(part.startswith("_") for part in p.relative_to(HTML).parts)) \
    if HTML.is_dir() else []


def _visible_text(path: Path) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
    main = soup.find("main") or soup
    for hidden in main.find_all(["script", "style"]):
        hidden.decompose()
    return main.get_text(" ")


# pages executed before their cells were tagged to hide such output (re-executed by a later step)
@pytest.mark.skipif(not PAGES, reason="no rendered book: run `make book` (or `make render`) first")
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(HTML)))
def test_page_shows_no_build_paths_warnings_or_progress_bars(page):
    text = _visible_text(page)
    # this build's folder, and any absolute path of a build machine (the pages were built elsewhere)
    for pattern in (re.escape(str(ROOT)), r"(?<![\w.])/(?:work|tmp|root|home|Users)/[\w.-]+/", r"\bWarning\b",
                    r"\bit/s\b", r"site-packages",
                    # a table's delimiter row as text: a Markdown output rendered without table syntax
                    r"\|\s*:?[-\u2013\u2014]+:?\s*\|"):
        match = re.search(pattern, text)
        assert match is None, f"{page.name} shows {match.group(0)!r}: ...{text[max(0, match.start() - 100):match.end() + 100]}..."
