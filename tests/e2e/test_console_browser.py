"""The /console dashboard in a real headless chromium (selenium) against a real keyed server:
the key prompt, the tenant's runs only, a loss curve with one point per step that updates live
while the run trains, a non-blank chart in a screenshot, and the playground's streamed sample.

The browser comes from Debian's chromium + chromium-driver; `scripts/setup_browser.sh`
installs them when missing, and the test skips (saying why) only when that fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import bios
from bios import types
from server_process import KEY_A, KEY_B, REPO, ServerProcess

TINY = "bios/tiny-llama"
TOKENS = [1, 504, 2119, 314, 260, 1345, 282, 900, 901, 902, 903, 904]
STEPS = 5
CHART_RGB = (0x6B, 0x46, 0xC1)  # the loss series' stroke in console.js


def _need(cmd: list[str], what: str) -> None:
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        pytest.skip(f"{what}: {p.stderr.strip() or p.stdout.strip()}")


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        _need([str(REPO / "scripts" / "setup_browser.sh")], "no headless browser")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                    "(scripts/setup_browser.sh installs it)")
    from selenium.webdriver.chrome.service import Service

    vendor = REPO / "src" / "bios" / "server" / "console" / "vendor" / "uPlot.iife.min.js"
    if not vendor.is_file():
        _need([str(REPO / "scripts" / "setup_console_assets.sh")], "no charting library")
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1800"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or "chromium"
    d = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    d.set_script_timeout(60)
    yield d
    d.quit()


def train(service: bios.ServiceClient, steps: int, seed: int) -> Any:
    tc = service.create_lora_training_client(base_model=TINY, rank=4, seed=seed)
    step(tc, steps)
    return tc


def step(tc: Any, steps: int) -> None:
    d = types.Datum(model_input=types.ModelInput.from_ints(TOKENS[:-1]),
                    loss_fn_inputs={"target_tokens": TOKENS[1:]})
    for _ in range(steps):
        tc.forward_backward([d], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)


def wait_for(driver: Any, script: str, expected: Any, timeout: float = 90) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.25).until(
        lambda d: d.execute_script(script) == expected,
        f"{script!r} never returned {expected!r} (last: {driver.execute_script(script)!r})")


def chart_pixels(png: bytes) -> tuple[int, int, float]:
    """(pixels that are not background, pixels near the loss series' colour, the fraction
    of the image's width those span)."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    ink = series = 0
    xs = []
    for i, (r, g, b) in enumerate(img.getdata()):
        if min(r, g, b) < 235:
            ink += 1
        if abs(r - CHART_RGB[0]) + abs(g - CHART_RGB[1]) + abs(b - CHART_RGB[2]) < 60:
            series += 1
            xs.append(i % img.width)
    return ink, series, (max(xs) - min(xs)) / img.width if xs else 0.0


def test_dashboard_shows_the_tenants_runs_live(driver, keyed_server: ServerProcess,
                                               tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    alice = bios.ServiceClient(base_url=keyed_server.base_url, api_key=KEY_A)
    bob = bios.ServiceClient(base_url=keyed_server.base_url, api_key=KEY_B)
    tc = train(alice, STEPS, seed=1)
    bob_run = train(bob, 1, seed=2).model_id
    run = tc.model_id

    driver.get(f"{keyed_server.base_url}/console")
    key = driver.find_element(By.ID, "key")
    assert key.is_displayed()  # the key prompt comes first
    key.send_keys(KEY_A)
    driver.find_element(By.CSS_SELECTOR, "#login button").click()
    points = f"return window.biosConsole.lossPoints({run!r})"
    wait_for(driver, points, STEPS)
    rows = [e.get_attribute("data-run-id")
            for e in driver.find_elements(By.CSS_SELECTOR, "#runs tbody tr")]
    assert run in rows and bob_run not in rows
    assert bob_run not in driver.page_source
    row = driver.find_element(By.CSS_SELECTOR, f'#runs tr[data-run-id="{run}"]')
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[2] == str(STEPS) and float(cells[3]) > 0

    # live: a step trained while the page is open shows up without a reload
    step(tc, 1)
    wait_for(driver, points, STEPS + 1)
    wait_for(driver, "return window.biosConsole.state.charts.util.data[0].length > 0", True)

    figure = driver.find_element(By.CSS_SELECTOR, f'figure[data-run-id="{run}"]')
    assert figure.get_attribute("data-points") == str(STEPS + 1)
    png = figure.find_element(By.TAG_NAME, "canvas").screenshot_as_png
    (tmp_path / "loss_chart.png").write_bytes(png)
    ink, series, span = chart_pixels(png)
    assert ink > 800, f"the loss chart looks blank ({ink} non-background pixels)"
    assert series > 300, f"no loss line in the chart ({series} pixels of its colour)"
    assert span > 0.7, f"the loss line spans only {span:.0%} of the chart's width"

    # the playground streams a greedy sample of the base model: the same text as the API's
    driver.find_element(By.ID, "pg-prompt").send_keys("The ledger balances")
    max_tokens = driver.find_element(By.ID, "pg-max")
    max_tokens.clear()
    max_tokens.send_keys("24")
    temp = driver.find_element(By.ID, "pg-temp")
    temp.clear()
    temp.send_keys("0")
    wait_for(driver, "return document.getElementById('pg-model').options.length > 0", True)
    driver.execute_script(f"document.getElementById('pg-model').value = {TINY!r}")
    driver.find_element(By.ID, "pg-go").click()
    wait_for(driver, "return document.getElementById('pg-go').disabled", False, 120)
    expected = httpx.post(f"{keyed_server.base_url}/v1/completions", timeout=120,
                          headers={"Authorization": f"Bearer {KEY_A}"},
                          json={"model": TINY, "prompt": "The ledger balances", "max_tokens": 24,
                                "temperature": 0}).json()["choices"][0]["text"]
    assert driver.find_element(By.ID, "pg-out").get_attribute("textContent") == expected

    shot = os.environ.get("BIOS_CONSOLE_SCREENSHOT")  # docs/console.png is made this way
    page = tmp_path / "console.png"
    driver.save_screenshot(str(page))
    if shot:
        shutil.copy(page, shot)
    assert page.stat().st_size > 10_000


def test_a_wrong_key_is_refused_in_the_page(driver, keyed_server: ServerProcess) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{keyed_server.base_url}/console")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{keyed_server.base_url}/console")
    driver.find_element(By.ID, "key").send_keys("not-a-key")
    driver.find_element(By.CSS_SELECTOR, "#login button").click()
    wait_for(driver, "return document.getElementById('login-error').textContent.includes("
             "'refused')", True)
    assert not driver.find_element(By.ID, "main").is_displayed()
