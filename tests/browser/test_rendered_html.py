"""The rendered book in a real browser (headless Chromium, Debian packages `chromium` and
`chromium-driver`): math is typeset by the bundled MathJax and figures load, from pages opened
straight from disk. Run with `make check-html` after `make book` (not part of `make test`)."""
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "book" / "_build" / "html"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (HTML / "index.html").is_file():
        pytest.fail("no rendered book: run `make book` (or `make render`) first")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--allow-file-access-from-files"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _typeset_math(driver) -> int:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "return window.MathJax !== undefined && MathJax.Hub !== undefined && "
        "MathJax.Hub.queue.pending === 0 && MathJax.Hub.queue.running === 0"))
    message = driver.execute_script("var m = document.getElementById('MathJax_Message'); return m ? m.textContent : ''")
    assert "failed" not in message.lower(), message
    return driver.execute_script("return document.querySelectorAll('.MathJax, .MathJax_Display, .MathJax_CHTML').length")


def _external_requests(driver) -> list[str]:
    return driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".filter(n => n.startsWith('http'))")


def test_intro_page_typesets_math_offline(browser):
    browser.get((HTML / "intro.html").as_uri())
    assert _typeset_math(browser) > 3
    assert "MathJax" in browser.execute_script("return MathJax.version ? 'MathJax ' + MathJax.version : ''")
    assert _external_requests(browser) == []


def _pages() -> list[str]:
    """Every page of the rendered book (the search and index pages and redirect stubs aside:
    jupyter-book writes index.html as a one-line redirect to the first page)."""
    if not HTML.is_dir():
        return []
    skip = {"search.html", "genindex.html", "py-modindex.html"}
    return sorted(str(p.relative_to(HTML)) for p in HTML.rglob("*.html")
                  if p.name not in skip and not any(part.startswith("_") for part in p.relative_to(HTML).parts)
                  and not p.read_text(errors="replace").lstrip().startswith('<meta http-equiv="Refresh"'))


# a display equation is clipped when it is wider than its box and the box does not scroll
_CLIPPED_MATH = """
return Array.from(document.querySelectorAll('.MathJax_Display, div.math')).filter(e => {
  const box = e.closest('div.math') || e;
  const style = getComputedStyle(box);
  const scrolls = ['auto', 'scroll'].includes(style.overflowX);
  return e.scrollWidth > box.clientWidth + 2 && !scrolls;
}).map(e => e.textContent.slice(0, 80));
"""


def _load(browser, page):
    browser.set_window_size(1400, 1000)   # the width at which equations were clipped
    browser.get((HTML / page).as_uri())
    # Sphinx loads MathJax only on pages with math (not, e.g., the API reference)
    if browser.execute_script("return !!document.querySelector('script[src*=\"MathJax.js\"]')"):
        _typeset_math(browser)


@pytest.mark.parametrize("page", _pages() or ["intro.html"])
def test_every_page_typesets_math_without_clipping(browser, page):
    _load(browser, page)
    assert browser.execute_script(_CLIPPED_MATH) == []


@pytest.mark.parametrize("page", _pages() or ["intro.html"])
def test_every_page_loads_its_images_with_alt_text_and_leaks_nothing(browser, page):
    _load(browser, page)
    images = browser.execute_script(
        "return Array.from(document.querySelectorAll('main img')).map(i => [i.complete, i.naturalWidth, i.alt, i.src])")
    assert all(complete and width > 0 for complete, width, _, _ in images), images
    # alt text says what the figure shows, not the image's file name (a hash)
    assert all(alt and not src.endswith(alt) and not alt.endswith((".png", ".svg")) for _, _, alt, src in images), images
    text = browser.execute_script("return document.querySelector('main').innerText")
    # raw TeX left on the page: math that MathJax did not typeset (a DataFrame header, say)
    assert "\\(" not in text and "\\sim" not in text, page
    for leak in (str(ROOT), "Warning", " it/s"):
        assert leak not in text, f"{page} shows {leak!r}"
    assert _external_requests(browser) == []


@pytest.mark.parametrize("page", ["notebooks/00_exact_vae.html", "notebooks/02_free_bits_vs_mdr.html"])
def test_notebook_page_has_math_and_loaded_figures(browser, page):
    browser.get((HTML / page).as_uri())
    assert _typeset_math(browser) > 0
    images = browser.execute_script(
        "return Array.from(document.querySelectorAll('main img')).map(i => [i.complete, i.naturalWidth])")
    assert len(images) >= 2
    assert all(complete and width > 0 for complete, width in images), images
    assert _external_requests(browser) == []
