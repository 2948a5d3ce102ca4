"""End to end: a replayed Binance session -> the real marketflow process with a `kind = "binance"`
exchange -> the REST API and /health."""

from __future__ import annotations

from tests.e2e.conftest import Factory
from tests.procs import wait_for
from tests.venue_server import recorded_trades, venue_server_thread


def test_a_binance_connector_feeds_the_service(marketflow: Factory) -> None:
    with venue_server_thread("binance") as server:
        # No symbol_map: the defaults map the five pairs; the recording trades two of them
        # (its DOTUSDT is not subscribed, so the server does not send it).
        mf = marketflow(
            {
                "exchanges": [{"name": "binance1", "kind": "binance", "url": server.url}],
                # the replay spans 70 s of the recent past: a slow start must not age it out
                "app": {"mode": "live", "max_clock_skew_s": 600},
            }
        )
        trades = [
            (pair, float(price), ts + server.delta_s * 1000)
            for pair, price, ts, _ in recorded_trades("binance")
            if pair in ("BTCUSDT", "ETHUSDT")
        ]

        def counted() -> dict[str, object] | None:
            source = mf.health()["sources"]["binance1"]
            return source if source["messages"] >= len(trades) else None

        source = wait_for(counted, 30, "every recorded trade counted")
        assert source["messages"] == len(trades)
        assert source["status"] == "connected"
        assert source["rejected"] == 0 and source["reconnects"] == 0
        assert server.connections == 1
        for symbol in ("BTCUSDT", "ETHUSDT"):
            ticks = [t for t in trades if t[0] == symbol]
            newest = max(ts for _, _, ts in ticks)
            price = [p for _, p, ts in ticks if ts == newest][-1]  # ties: the later arrival
            answer = mf.get(f"/prices/latest/binance1/{symbol}").json()
            assert (answer["price"], answer["timestamp"]) == (price, newest)
        assert mf.get("/prices/latest/binance1/DOGEUSDT").status_code == 404
