"""The dashboard's weight and time to first price, in headless Debian chromium.

    .venv/bin/python -m benchmarks.bench_dashboard [--loads 10]

Against a test-mode marketflow (its own database and key prefix), each load opens the page in
a fresh browser context (empty cache) and reads the browser's own Performance API:
- weight: bytes transferred for the document and every resource it loaded (`transferSize`:
  headers plus the body as sent, gzip-compressed where the browser accepts it), and the same
  bodies uncompressed (`decodedBodySize`); the WebSocket's frames are not counted;
- time to first price: from the start of navigation to the first price drawn on the board
  (the page's `first-price` performance mark), which includes loading the modules, opening
  the WebSocket (`ws-open`), its snapshot (`first-frame`) and the first animation frame;
- a reload in the same context: what revalidation (304 answers) still costs.
Printed: the median and the worst of the loads.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from benchmarks.common import emit, progress, rounded
from tests.browser.harness import chromium_problem, launch, marketflow_for_browser

FIRST_PRICE = "() => performance.getEntriesByName('first-price').length > 0"
READ = """() => {
  const entries = [...performance.getEntriesByType('navigation'),
                   ...performance.getEntriesByType('resource')];
  return {
    first_price_ms: performance.getEntriesByName('first-price')[0]?.startTime ?? null,
    ws_open_ms: performance.getEntriesByName('ws-open')[0]?.startTime ?? null,
    first_frame_ms: performance.getEntriesByName('first-frame')[0]?.startTime ?? null,
    dom_content_loaded_ms: performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd,
    transferred: entries.reduce((n, e) => n + e.transferSize, 0),
    decoded: entries.reduce((n, e) => n + e.decodedBodySize, 0),
    requests: entries.length,
    files: entries.map((e) => [new URL(e.name).pathname, e.transferSize, e.decodedBodySize]),
  };
}"""


def load(context: Any, url: str) -> dict[str, Any]:
    page = context.new_page()
    page.goto(url)
    page.wait_for_function(FIRST_PRICE, timeout=15_000)
    page.wait_for_load_state("load")
    first = dict(page.evaluate(READ))
    page.reload()
    page.wait_for_function(FIRST_PRICE, timeout=15_000)
    page.wait_for_load_state("load")
    first["reload"] = dict(page.evaluate(READ))
    page.close()
    return first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=10)
    args = parser.parse_args(argv)
    problem = chromium_problem()
    if problem:
        progress(problem)
        return 1
    from playwright.sync_api import sync_playwright

    with marketflow_for_browser() as mf, sync_playwright() as playwright:
        browser = launch(playwright)
        runs = []
        for i in range(args.loads):
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            runs.append(load(context, mf.url + "/"))
            context.close()
            progress(f"load {i + 1}: {runs[-1]['first_price_ms']:.0f} ms to first price")
        browser.close()
    first = [r["first_price_ms"] for r in runs]
    emit(
        "dashboard",
        "page",
        loads=len(runs),
        transferred_kb=rounded(statistics.median(r["transferred"] for r in runs) / 1024),
        decoded_kb=rounded(statistics.median(r["decoded"] for r in runs) / 1024),
        requests=runs[0]["requests"],
        reload_transferred_kb=rounded(
            statistics.median(r["reload"]["transferred"] for r in runs) / 1024
        ),
        first_price_ms_median=rounded(statistics.median(first), 0),
        first_price_ms_max=rounded(max(first), 0),
        reload_first_price_ms_median=rounded(
            statistics.median(r["reload"]["first_price_ms"] for r in runs), 0
        ),
        ws_open_ms_median=rounded(statistics.median(r["ws_open_ms"] for r in runs), 0),
        first_frame_ms_median=rounded(statistics.median(r["first_frame_ms"] for r in runs), 0),
        dom_content_loaded_ms_median=rounded(
            statistics.median(r["dom_content_loaded_ms"] for r in runs), 0
        ),
        files=runs[0]["files"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
