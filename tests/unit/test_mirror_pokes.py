"""When the mirror wakes the WebSocket hub: only for messages that change a key it mirrors.

In role `all` the mirror also receives the `updates` messages of its own flushes; those keys are
owned and the messages change nothing. Waking the hub for them moved its steps onto the flush's
schedule, so a client's paced frame could leave up to an interval after the prices it carried
(WebSocket freshness p50 went from ~15 ms to ~60 ms)."""

from __future__ import annotations

from typing import Any, cast

from marketflow.health import StoreHealth
from marketflow.live import encode_update
from marketflow.mirror import Mirror
from marketflow.models import Mode
from marketflow.state import MarketState

OWN = ("ex1", "BTCUSDT")
OTHER = ("ex2", "BTCUSDT")


def mirror_with_pokes() -> tuple[Mirror, MarketState, list[int]]:
    state = MarketState(300)
    state.key(*OWN)  # created owned (role all ingests ex1)
    state.key(*OTHER).owned = False  # held by another instance: mirrored
    pokes: list[int] = []
    mirror = Mirror(
        state,
        cast(Any, None),  # no Redis call is made by apply_messages
        StoreHealth("redis-mirror"),
        [OWN, OTHER],
        mode=Mode.TEST,
        on_change=lambda: pokes.append(1),
    )
    return mirror, state, pokes


def test_messages_of_owned_keys_leave_the_hub_alone() -> None:
    mirror, state, pokes = mirror_with_pokes()
    own = encode_update(instance="me", seq=1, mode="test", latest=[(OWN, 101.5, 1_000)])
    assert mirror.apply_messages([own]) is False
    assert pokes == []
    assert state.keys[OWN].latest_ts == -1  # an owned key is never written by the mirror


def test_a_message_changing_a_mirrored_key_wakes_the_hub_once() -> None:
    mirror, state, pokes = mirror_with_pokes()
    own = encode_update(instance="me", seq=1, mode="test", latest=[(OWN, 101.5, 1_000)])
    other = encode_update(instance="them", seq=1, mode="test", latest=[(OTHER, 99.0, 2_000)])
    mirror.apply_messages([own, other])
    assert pokes == [1]
    assert (state.keys[OTHER].latest_price, state.keys[OTHER].latest_ts) == (99.0, 2_000)
