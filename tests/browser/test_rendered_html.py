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


@pytest.mark.parametrize("page", ["notebooks/00_exact_vae.html", "notebooks/02_free_bits_vs_mdr.html"])
def test_notebook_page_has_math_and_loaded_figures(browser, page):
    browser.get((HTML / page).as_uri())
    assert _typeset_math(browser) > 0
    images = browser.execute_script(
        "return Array.from(document.querySelectorAll('main img')).map(i => [i.complete, i.naturalWidth])")
    assert len(images) >= 2
    assert all(complete and width > 0 for complete, width in images), images
    assert _external_requests(browser) == []
