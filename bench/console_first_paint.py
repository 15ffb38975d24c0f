#!/usr/bin/env python
"""The /console dashboard's first paint with 50 runs on the server, in headless chromium.

Starts a local `bios serve` on the tiny model, creates `--runs` runs of `--steps` steps each,
then loads /console `--loads` times in one browser and reads, per load, the browser's own paint
timings (`first-paint`, `first-contentful-paint`, from navigation start) and the time until
the runs table holds every run with its loss curve drawn ("data ready", which waits on the
API calls the page makes). Medians are printed with the load average; results go to
bench/results/console_first_paint.json.

    .venv/bin/python bench/console_first_paint.py            # 50 runs, 7 loads
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import bios
from bios import types
from harness import REPO, load, machine
from server_process import ServerProcess

TINY = "bios/tiny-llama"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--loads", type=int, default=7)
    args = ap.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    data = Path(tempfile.mkdtemp(prefix="bios-console-bench-"))
    server = ServerProcess(data, [TINY]).start()
    try:
        service = bios.ServiceClient(base_url=server.base_url)
        d = types.Datum(model_input=types.ModelInput.from_ints([1, 504, 2119, 314, 260]),
                        loss_fn_inputs={"target_tokens": [504, 2119, 314, 260, 1345]})
        clients = [service.create_lora_training_client(base_model=TINY, rank=4, seed=i)
                   for i in range(args.runs)]
        futures = []
        for _ in range(args.steps):
            for tc in clients:
                tc.forward_backward([d], "cross_entropy")
                futures.append(tc.optim_step(types.AdamParams(learning_rate=1e-3)))
        for f in futures:
            f.result(timeout=600)

        opts = webdriver.ChromeOptions()
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--window-size=1400,1800"):
            opts.add_argument(arg)
        opts.binary_location = shutil.which("chromium") or "chromium"
        driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
        ready_js = (f"return window.biosConsole && window.biosConsole.ready && "
                    f"document.querySelectorAll('#runs tbody tr').length == {args.runs} && "
                    f"[...document.querySelectorAll('figure[data-points]')].length == {args.runs}")
        loads = []
        try:
            for i in range(args.loads + 1):  # the first load warms the browser's cache
                driver.get(f"{server.base_url}/console")
                WebDriverWait(driver, 120, poll_frequency=0.01).until(
                    lambda dr: dr.execute_script(ready_js))
                ready_ms = driver.execute_script("return performance.now()")
                paints = driver.execute_script(
                    "return Object.fromEntries(performance.getEntriesByType('paint')"
                    ".map(e => [e.name, e.startTime]))")
                nav = driver.execute_script(
                    "const n = performance.getEntriesByType('navigation')[0];"
                    "return {response_end: n.responseEnd, dom_content_loaded: "
                    "n.domContentLoadedEventEnd}")
                if i:
                    loads.append({"first_paint_ms": paints.get("first-paint"),
                                  "first_contentful_paint_ms":
                                      paints.get("first-contentful-paint"),
                                  "data_ready_ms_at_most": ready_ms, **nav})
        finally:
            driver.quit()
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)

    def median(key: str) -> float:
        return statistics.median(x[key] for x in loads if x[key] is not None)

    result = {"runs": args.runs, "steps": args.steps, "loads": loads,
              "median_first_paint_ms": median("first_paint_ms"),
              "median_first_contentful_paint_ms": median("first_contentful_paint_ms"),
              "median_data_ready_ms_at_most": median("data_ready_ms_at_most"),
              "load_average": load(), "machine": machine(), "time": time.time()}
    out = REPO / "bench" / "results" / "console_first_paint.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k.startswith("median")}, indent=2))
    print(f"load average: {result['load_average']}")
    print(f"console first paint with {args.runs} runs: {result['median_first_paint_ms']:.0f} ms"
          f" (first contentful {result['median_first_contentful_paint_ms']:.0f} ms, data "
          f"ready <= {result['median_data_ready_ms_at_most']:.0f} ms); wrote {out}")


if __name__ == "__main__":
    main()
