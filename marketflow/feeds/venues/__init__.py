"""The exchange connectors' venues, by `[[exchanges]] kind` (contract: exchange connectors).

Adding a venue: a module here with a `VENUE` (see `base.Venue`), one line below, a recording and
a replay rule in the tests; docs/connectors.md says the rest.
"""

from __future__ import annotations

from marketflow.feeds.venues import binance, bybit, coinbase, kraken, okx
from marketflow.feeds.venues.base import Venue

VENUES: dict[str, Venue] = {
    venue.kind: venue
    for venue in (binance.VENUE, coinbase.VENUE, kraken.VENUE, okx.VENUE, bybit.VENUE)
}
