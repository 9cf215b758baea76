"""The decoding playground in a real browser: JupyterLab on localhost, headless Chromium (Debian's package, driven by
Selenium with the system driver: nothing is downloaded), notebook 19 run in it, a slider moved, the output changed.

Skips with the reason when the browser, its driver, Selenium or JupyterLab is missing (`.ci/setup` installs them).
A screenshot of the playground after the move is kept in `runs/browser/`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mfkit.paths import notebooks_dir, runs_dir
from mfkit.serve import free_port

pytestmark = [pytest.mark.browser, pytest.mark.notebooks, pytest.mark.slow]
NOTEBOOK = "19_decoding-inference.ipynb"
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver") or (
    "/usr/lib/chromium/chromedriver" if Path("/usr/lib/chromium/chromedriver").exists() else None
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, smoke_chain):
    """A parameterized copy of notebook 19 (smoke) served by JupyterLab, on a copy of the smoke chain's tokenizer
    and tiny GPT (its own artifacts folder, so the chain's ledger stays as the chain wrote it)."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    pytest.importorskip("jupyterlab", reason="JupyterLab is not installed (pip install jupyterlab)")
    if not (BROWSER and DRIVER):
        pytest.skip("Chromium and its driver are not installed (apt-get install chromium chromium-driver)")
    import papermill

    root = tmp_path_factory.mktemp("lab")
    chain_artifacts = smoke_chain["output"] / "artifacts"
    for needed in ("tokenizer", "models/tiny-gpt"):  # what 01 and 02 wrote and 19 reads
        assert (chain_artifacts / needed).is_dir(), (
            f"the smoke chain wrote no {needed}: {smoke_chain['notebooks']}"
        )
        shutil.copytree(chain_artifacts / needed, root / "run" / "artifacts" / needed)
    papermill.execute_notebook(
        notebooks_dir() / NOTEBOOK,
        root / NOTEBOOK,
        parameters={
            "PROFILE": "smoke",
            "ARTIFACTS_DIR": str(root / "run" / "artifacts"),
            "INTERACTIVE": True,
        },
        prepare_only=True,
    )
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            f"--port={port}",
            "--ServerApp.token=",
            "--ServerApp.password=",
            f"--ServerApp.root_dir={root}",
            "--allow-root",
            "--LabApp.news_url=",  # no "Jupyter news" prompt over the notebook
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline"},
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}"
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def test_moving_a_slider_changes_the_playground_output(lab, browser):
    folder = runs_dir() / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _run_and_move_the_slider(lab, browser, folder)
    except Exception as exc:  # keep what the browser showed, for the report
        browser.save_screenshot(str(folder / "failure.png"))
        shown = browser.find_element("css selector", "body").text[-3000:]
        (folder / "failure.txt").write_text(shown)
        raise AssertionError(f"{type(exc).__name__}; the page ended with:\n{shown}") from exc


def _run_and_move_the_slider(lab, browser, folder):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(lab)
    wait = WebDriverWait(browser, 240)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")))
    # The kernel must be connected and idle before the cells are sent, or the keys can be lost.
    wait.until(lambda d: "Idle" in d.find_element(By.ID, "jp-main-statusbar").text)
    started = False
    # Run every cell: command mode, select all cells, run the selection (JupyterLab's default shortcuts).
    for _attempt in range(3):
        browser.find_element(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell").click()
        keys = ActionChains(browser).send_keys(Keys.ESCAPE)
        keys.key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL)
        keys.key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        try:
            WebDriverWait(browser, 60).until(
                lambda d: any(
                    p.text.strip() not in ("", "[ ]:")
                    for p in d.find_elements(By.CSS_SELECTOR, ".jp-InputPrompt")
                )
            )
            started = True
            break
        except Exception:
            continue
    assert started, "the notebook's cells did not start running"
    output = WebDriverWait(browser, 600).until(
        lambda d: next(
            (
                e
                for e in d.find_elements(By.CSS_SELECTOR, ".mfkit-playground-output")
                if e.find_elements(By.TAG_NAME, "img")
            ),
            None,
        )
    )
    before = output.get_attribute("innerHTML")
    slider = browser.find_element(
        By.XPATH, "//div[contains(@class,'widget-slider')][.//*[normalize-space(text())='temperature']]"
    )
    handle = slider.find_element(By.CSS_SELECTOR, ".noUi-handle")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", handle)
    handle.click()
    for _ in range(8):
        handle.send_keys(Keys.ARROW_RIGHT)
    WebDriverWait(browser, 240).until(
        lambda d: (
            (e := d.find_element(By.CSS_SELECTOR, ".mfkit-playground-output")).find_elements(
                By.TAG_NAME, "img"
            )
            and e.get_attribute("innerHTML") != before
        )
    )
    assert browser.save_screenshot(str(folder / "playground.png"))
    readout = slider.find_element(By.CSS_SELECTOR, ".widget-readout").text
    assert float(readout) > 0.8
