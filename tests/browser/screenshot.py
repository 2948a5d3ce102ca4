"""`make screenshot`: docs/dashboard.png, the dashboard as a person sees it.

    .venv/bin/python -m tests.browser.screenshot [PATH] [--width 1280] [--height 1000]
        [--settle SECONDS] [--interval 5s]

Starts a test-mode marketflow (its own database and key prefix), opens the page in headless
Debian chromium (dark colour scheme), waits until every price is on the board and `--settle`
seconds more (by default just over a minute, so the 1 m change has its reference price and
the chart a few candles), then saves a screenshot of the whole page and stops marketflow.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tests.browser.harness import chromium_problem, launch, marketflow_for_browser

FULL_BOARD = "() => document.querySelectorAll('#board .price[data-value]').length >= 15"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="docs/dashboard.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--settle", type=float, default=65.0)
    parser.add_argument("--interval", default="5s", help="the chart's candle interval")
    args = parser.parse_args(argv)
    problem = chromium_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    with marketflow_for_browser() as mf, sync_playwright() as playwright:
        browser = launch(playwright)
        context = browser.new_context(
            viewport={"width": args.width, "height": args.height}, color_scheme="dark"
        )
        page = context.new_page()
        page.goto(mf.url + "/")
        page.wait_for_function(FULL_BOARD, timeout=15_000)
        page.select_option("#chart-interval", args.interval)
        print(f"waiting {args.settle:.0f} s for a minute of history…", file=sys.stderr)
        time.sleep(args.settle)  # a person's view after a minute, not a condition to wait on
        Path(args.path).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.path, full_page=True)
        browser.close()
    print(f"wrote {args.path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
