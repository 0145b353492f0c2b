"""The web page of `mlxvid serve` in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium): submit a job on a tiny model, see its progress and preview, play it in the gallery, find it by its
prompt, cancel a second job. A screenshot of each state goes to $MLXVID_TEST_ARTIFACTS (else the test's
temporary folder); they are not committed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from support.serve import ServeProcess

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("diffusers")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                "(apt-get install chromium chromium-driver; .ci/run installs them)")


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from support.wan_checkpoints import converted_tiny_ti2v

    root = tmp_path_factory.mktemp("studio")
    serve = ServeProcess(root / "data", [converted_tiny_ti2v(root, "tiny-ti2v")]).start()
    yield serve
    serve.stop()


def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("MLXVID_TEST_ARTIFACTS", tmp_path)) / "serve-browser"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def fill(browser, name: str, value: str) -> None:
    field = browser.find_element("name", name)
    field.clear()
    field.send_keys(value)


def submit(browser, prompt: str, steps: str) -> None:
    from selenium.webdriver.common.by import By

    fill(browser, "prompt", prompt)
    browser.find_element(By.CSS_SELECTOR, "details summary").click() if not browser.find_element(
        By.NAME, "size").is_displayed() else None
    fill(browser, "size", "64x32")
    fill(browser, "frames", "5")
    fill(browser, "steps", steps)
    browser.find_element(By.ID, "submit").click()


def test_the_studio_page(browser, studio, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out = shots(tmp_path)
    from selenium.common.exceptions import StaleElementReferenceException

    # the queue re-renders on every progress event: elements found a moment ago may be stale
    wait = WebDriverWait(browser, 120, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException])
    browser.get(studio.url + "/")
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option"))
    browser.save_screenshot(str(out / "1-form.png"))

    submit(browser, "a paper boat on a pond", "200")  # long enough to watch its progress
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#queue li img.preview"))
    wait.until(lambda b: int(b.find_element(By.CSS_SELECTOR, "#queue li progress").get_attribute("value") or 0) > 0)
    wait.until(lambda b: "step" in b.find_element(By.CSS_SELECTOR, "#queue li .status").text)
    browser.save_screenshot(str(out / "2-progress.png"))

    submit(browser, "a second job to cancel", "1000")
    # the first job may already have finished on a fast machine: wait for the second, not for two entries
    wait.until(lambda b: any("second job" in li.text for li in b.find_elements(By.CSS_SELECTOR, "#queue li")))
    # the queue re-renders on every progress event, so find and click in one script
    wait.until(lambda b: b.execute_script(
        "for (const li of document.querySelectorAll('#queue li')) if (li.textContent.includes('second job')) "
        "{ li.querySelector('button.cancel').click(); return true; } return false;"))

    card = '#gallery .card[data-status="completed"] video'
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, card))
    video = browser.find_element(By.CSS_SELECTOR, card)
    wait.until(lambda b: b.execute_script("return arguments[0].readyState >= 1 && arguments[0].duration > 0", video))
    duration = browser.execute_script("return arguments[0].duration", video)
    assert 0 < duration < 2  # 5 frames at 24 fps
    browser.execute_script("document.getElementById('gallery-section').scrollIntoView()")
    browser.save_screenshot(str(out / "3-gallery.png"))
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, '#gallery .card[data-status="cancelled"]'))
    cancelled = browser.find_element(By.CSS_SELECTOR, '#gallery .card[data-status="cancelled"]')
    assert "cancelled" in cancelled.text and "second job" in cancelled.text

    fill(browser, "search", "paper boat")
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#gallery .card")) == 1)
    assert "paper boat" in browser.find_element(By.CSS_SELECTOR, "#gallery .card").text
    browser.execute_script("document.getElementById('gallery-section').scrollIntoView()")
    browser.save_screenshot(str(out / "4-search.png"))

    fill(browser, "prompt", "x")
    fill(browser, "size", "not-a-size")
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda b: "WIDTHxHEIGHT" in b.find_element(By.ID, "error").text)  # the CLI's words
    browser.save_screenshot(str(out / "5-error.png"))
