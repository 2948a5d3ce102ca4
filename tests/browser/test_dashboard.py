"""The dashboard in headless chromium against the real marketflow process in test mode."""

from __future__ import annotations

import re
import signal
import sys
from typing import Any

import httpx

from tests.browser.conftest import Opener
from tests.e2e.conftest import Factory

SYMBOLS = ("BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT")
TEST_SOURCES = ("test-exchange1", "test-exchange2", "test-exchange3")

# The board's prices as {"SYMBOL/source": price}, read from the cells' data-value.
READ_BOARD = """() => Object.fromEntries(
  [...document.querySelectorAll('#board tr[data-exchange]')]
    .filter((tr) => tr.querySelector('.price').dataset.value)
    .map((tr) => [`${tr.dataset.symbol}/${tr.dataset.exchange}`,
                  Number(tr.querySelector('.price').dataset.value)]))"""
# True once at least `min` of the prices in `before` differ on the board.
PRICES_CHANGED = f"""([before, min]) => {{
  const now = ({READ_BOARD})();
  return Object.keys(before).filter((k) => k in now && now[k] !== before[k]).length >= min;
}}"""
ALL_PRICES = f"(n) => Object.keys(({READ_BOARD})()).length >= n"


def board(page: Any) -> dict[str, float]:
    return dict(page.evaluate(READ_BOARD))


def wait_for_full_board(page: Any, timeout_ms: int = 5000) -> dict[str, float]:
    page.wait_for_function(ALL_PRICES, arg=len(SYMBOLS) * len(TEST_SOURCES), timeout=timeout_ms)
    return board(page)


def test_board_shows_every_price_live_with_health_under_a_strict_policy(
    marketflow: Factory, open_page: Opener
) -> None:
    mf = marketflow()
    page, log = open_page()
    response = page.goto(mf.url + "/")
    assert response.status == 200

    policy = response.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"  # no inline script, no eval
    assert "unsafe" not in policy
    assert directives["frame-ancestors"] == "'none'"
    assert directives["connect-src"].startswith("'self'")
    assert response.headers["x-content-type-options"] == "nosniff"

    first = wait_for_full_board(page)  # within 5 s of the page's load
    assert set(first) == {f"{s}/{x}" for s in SYMBOLS for x in TEST_SOURCES}
    assert all(price > 0 for price in first.values())
    page.wait_for_function(PRICES_CHANGED, arg=[first, 10], timeout=5000)
    # Every row shows a spread to the median and an age; the 1 m change waits for a minute.
    cells = page.locator("#board tr[data-exchange] .spread")
    assert all(re.fullmatch(r"[+\u2212]\d+(\.\d)? bp", t) for t in cells.all_inner_texts())
    ages = page.locator("#board tr[data-exchange] .age").all_inner_texts()
    assert all(re.fullmatch(r"\d+\.\d s", t) for t in ages), ages

    # Health: status, each current source connected with its message rate, both stores.
    page.wait_for_function(
        "() => [...document.querySelectorAll('#feeds tr[data-current=true] td.num')]"
        ".some((td) => Number(td.textContent) > 0)"
    )
    assert page.locator("#health-status").inner_text() == "ok"
    for source in TEST_SOURCES:
        row = page.locator(f'#feeds tr[data-source="{source}"]')
        assert row.locator(".feed-status").inner_text() == "connected"
    stores = page.locator("#stores .store")
    assert sorted(stores.evaluate_all("els => els.map((e) => e.dataset.status)")) == ["ok", "ok"]
    assert page.locator("#mode-name").inner_text() == "test"
    assert page.locator("#conn").get_attribute("data-state") == "open"

    # The licence's attribution: TradingView named and linked, the library's notice shown.
    assert page.locator('footer a[href="https://www.tradingview.com/"]').count() == 1
    assert "TradingView" in page.locator("#chart-attribution").inner_text()
    assert page.locator("#chart-notice").inner_text() != "chart library not installed"

    assert log.errors == []
    assert log.console_errors() == []
    assert log.foreign_requests(mf.url) == []


def test_chart_draws_candles_and_follows_the_forming_one(
    marketflow: Factory, open_page: Opener
) -> None:
    """Needs the candle endpoint and the WebSocket `candles` frames (protocol v1)."""
    mf = marketflow()
    page, log = open_page()
    page.goto(mf.url + "/")
    legend = page.locator("#chart-legend")
    page.wait_for_function(
        "() => document.getElementById('chart-legend').dataset.t !== undefined", timeout=10_000
    )
    before = (legend.get_attribute("data-count"), legend.get_attribute("data-close"))
    page.wait_for_function(
        """([count, close]) => {
             const d = document.getElementById('chart-legend').dataset;
             return Number(d.updates) > 0 && (d.count !== count || d.close !== close);
           }""",
        arg=list(before),
        timeout=10_000,
    )
    assert page.locator("#chart-notice").is_hidden()
    # The candles are on a canvas: some of its pixels are painted.
    painted = page.evaluate(
        """() => [...document.querySelectorAll('#chart canvas')].some((c) => {
             if (!c.width || !c.height) return false;
             const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
             for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) return true;
             return false;
           })"""
    )
    assert painted
    # Another interval reloads the history for it.
    page.select_option("#chart-interval", "5s")
    page.wait_for_function(
        "() => document.getElementById('chart-legend').textContent.includes('· 5s ·')"
    )
    page.wait_for_function("() => document.getElementById('chart-legend').dataset.t")
    assert log.errors == []
    assert log.console_errors() == []


def test_phone_screen_has_no_horizontal_scroll_and_controls_take_the_keyboard(
    marketflow: Factory, open_page: Opener
) -> None:
    mf = marketflow()
    page, log = open_page(width=390, height=844)
    page.goto(mf.url + "/")
    wait_for_full_board(page)
    page.wait_for_function("() => document.querySelectorAll('#feeds tr').length >= 3")
    widths = page.evaluate(
        "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth,"
        " document.body.scrollWidth]"
    )
    assert widths[0] <= widths[1] and widths[2] <= widths[1], widths
    # Nor inside: no board card or table needs scrolling sideways either.
    inner = page.evaluate(
        "() => [...document.querySelectorAll('.card, .table-wrap')]"
        ".map((e) => e.scrollWidth - e.clientWidth)"
    )
    assert inner and max(inner) <= 0, inner

    # Tab walks through every control, and the focused one is outlined.
    reached: list[str] = []
    for _ in range(12):
        page.keyboard.press("Tab")
        focused = page.evaluate(
            "() => { const e = document.activeElement;"
            " return [e.id, getComputedStyle(e).outlineStyle]; }"
        )
        if focused[0]:
            reached.append(focused[0])
            assert focused[1] != "none", focused
    assert {"mode-switch", "chart-symbol", "chart-source", "chart-interval"} <= set(reached)
    assert log.errors == []


def test_mode_switch_flips_the_mode_and_back(marketflow: Factory, open_page: Opener) -> None:
    mf = marketflow()
    page, log = open_page()
    page.goto(mf.url + "/")
    wait_for_full_board(page)
    button = page.locator("#mode-switch")
    # The board can fill before the first /mode answer names the mode on the button.
    page.wait_for_function(
        "() => document.getElementById('mode-switch').textContent === 'switch to live'"
    )
    button.click()
    page.wait_for_function("() => document.getElementById('mode-name').textContent === 'live'")
    assert httpx.get(mf.url + "/mode").json()["mode"] == "live"
    # Only the live sources remain: the test sources leave the board and the chart's list.
    page.wait_for_function("() => !document.querySelector('#board tr[data-exchange^=test-]')")
    options = page.locator("#chart-source option").all_inner_texts()
    assert options == ["all", "exchange1", "exchange2", "exchange3"]

    button.click()
    page.wait_for_function("() => document.getElementById('mode-name').textContent === 'test'")
    assert httpx.get(mf.url + "/mode").json()["mode"] == "test"
    wait_for_full_board(page)
    assert log.errors == []


def test_mode_switch_asks_for_the_admin_token(marketflow: Factory, open_page: Opener) -> None:
    mf = marketflow({"http": {"admin_token": "tok-7f3a"}})
    page, log = open_page()
    page.goto(mf.url + "/")
    page.wait_for_function("() => !document.getElementById('mode-switch').disabled")
    dialog = page.locator("#token-dialog")

    page.locator("#mode-switch").click()
    dialog.wait_for(state="visible")
    page.locator("#token-input").fill("wrong")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => document.getElementById('token-why').textContent.includes('refused')"
    )
    assert dialog.is_visible()
    assert httpx.get(mf.url + "/mode").json()["mode"] == "test"

    page.locator("#token-input").fill("tok-7f3a")
    page.get_by_role("button", name="switch", exact=True).click()
    page.wait_for_function("() => document.getElementById('mode-name').textContent === 'live'")
    assert dialog.is_hidden()
    assert httpx.get(mf.url + "/mode").json()["mode"] == "live"

    # The token is kept for this tab: switching back asks nothing.
    page.locator("#mode-switch").click()
    page.wait_for_function("() => document.getElementById('mode-name').textContent === 'test'")
    assert dialog.is_hidden()
    # Cancelling the dialog leaves the mode alone.
    page.evaluate("() => sessionStorage.clear()")
    page.locator("#mode-switch").click()
    dialog.wait_for(state="visible")
    page.locator("#token-cancel").click()
    page.wait_for_function(
        "() => document.getElementById('mode-msg').textContent === 'not switched'"
    )
    assert httpx.get(mf.url + "/mode").json()["mode"] == "test"
    assert log.errors == []


def test_page_recovers_by_itself_after_a_server_restart(
    marketflow: Factory, open_page: Opener
) -> None:
    mf = marketflow()
    page, log = open_page()
    page.goto(mf.url + "/")
    wait_for_full_board(page)

    mf.signal(signal.SIGTERM)
    assert mf.wait(20) == 0
    page.wait_for_function("() => document.getElementById('conn').dataset.state !== 'open'")
    page.wait_for_function(
        "() => document.getElementById('health-status').textContent === 'unreachable'"
    )
    frozen = board(page)

    # The same port again: the one exception to free ports, since the page knows only this one.
    marketflow({"http": {"port": mf.port}})
    page.wait_for_function(PRICES_CHANGED, arg=[frozen, 10], timeout=30_000)
    page.wait_for_function("() => document.getElementById('conn').dataset.state === 'open'")
    page.wait_for_function("() => document.getElementById('health-status').textContent === 'ok'")
    assert set(board(page)) == set(frozen)
    assert log.errors == []


# marketflow as a plain `pip install .` leaves it: the dashboard's files without vendor/.
WITHOUT_LIBRARY = """
import shutil, sys, tempfile
from pathlib import Path
import marketflow.dashboard as dashboard
root = Path(tempfile.mkdtemp())
shutil.copytree(Path(dashboard.__file__).parent, root, dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("vendor", "__pycache__"))
dashboard._default = dashboard.Dashboard(root)
from marketflow.cli import main
sys.exit(main())
"""


def test_without_the_chart_library_the_page_says_so_and_the_rest_works(
    marketflow: Factory, open_page: Opener
) -> None:
    mf = marketflow(command=[sys.executable, "-c", WITHOUT_LIBRARY])
    page, log = open_page()
    page.goto(mf.url + "/")
    notice = page.locator("#chart-notice")
    notice.wait_for(state="visible")
    assert "chart library not installed" in notice.inner_text()
    assert "chart library not installed" in page.locator("footer").inner_text()
    wait_for_full_board(page)
    assert not any("/assets/vendor/" in url for url in log.requests)
    assert httpx.get(mf.url + "/assets/vendor/lightweight-charts.mjs").status_code == 404
    assert log.errors == []
    assert log.console_errors() == []
