"""The store's subscription against a real Redis reached over a slow link (a test-owned proxy
that holds every chunk): a large `updates` message that has only partly arrived when the
subscription looks for the next one is read whole, never an error. (An api process following
1,000 keys gets messages of ~200 kB; reading the rest of one with a zero timeout raised
TimeoutError and cost the mirror its subscription every few tens of seconds.)"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import redis

from marketflow.config import RedisConfig
from marketflow.store.redis import RedisPriceStore
from tests.procs import TcpProxy, redis_prefix


@pytest.fixture
def prefix() -> Iterator[str]:
    with redis_prefix() as p:
        yield p


class PausingProxy(TcpProxy):
    """A `TcpProxy` that, once `pause_after(n)` is called, passes the server's next `n` bytes on
    in one piece and then holds the rest for `pause_s`: the reader sees a message that has only
    partly arrived, with more of it already waiting in its socket."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.pause_s = 0.5
        self._armed: int | None = None
        self._held = b""

    def pause_after(self, n: int) -> None:
        self._armed = n

    def _pass(self, data: bytes, dst: socket.socket, from_server: bool) -> None:
        n = self._armed
        if not from_server or n is None:
            dst.sendall(data)
            return
        self._held += data
        if len(self._held) < n:
            return  # gather the first n bytes, to pass them on in one piece
        self._armed = None
        held, self._held = self._held, b""
        dst.sendall(held[:n])
        time.sleep(self.pause_s)
        dst.sendall(held[n:])


@pytest.fixture
def proxy() -> Iterator[PausingProxy]:
    p = PausingProxy(6379)
    yield p
    p.close()


def store(prefix: str, port: int = 6379) -> RedisPriceStore:
    return RedisPriceStore(
        RedisConfig(key_prefix=prefix, port=port, timeout_ms=2000),
        window_seconds=300,
        ttl_seconds=70,
    )


def test_a_large_message_arriving_in_pieces_is_read_whole(prefix: str, proxy: PausingProxy) -> None:
    publisher = store(prefix)
    reader = store(prefix, proxy.port)
    sub = reader.subscribe(reader.updates_channel)
    try:
        # The subscription is confirmed before anything is published.
        deadline = time.monotonic() + 10
        while publisher.publish(publisher.updates_channel, b"hello") == 0:
            assert time.monotonic() < deadline, "the subscription never took effect"
            time.sleep(0.01)
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while not got:
            got += sub.drain(0.5)
            assert time.monotonic() < deadline, "the first message never arrived"

        # The small message and the first 100 kB of the big one arrive at once, the rest half a
        # second later: the reader takes the small one (64 kB at a time), finds more bytes
        # waiting, and must read the big one whole instead of giving up on it.
        proxy.pause_after(100_000)
        big = b"0123456789abcdef" * 65536  # 1 MiB (the store decodes replies as text)
        sent = [b"small", big, b"after"]
        # One pipelined round: Redis writes all three to the subscriber at once, so the small
        # one and the start of the big one reach the reader in the same chunk.
        raw = redis.Redis(port=6379)
        try:
            pipe = raw.pipeline(transaction=False)
            for body in sent:
                pipe.publish(publisher.updates_channel, body)
            pipe.execute()
        finally:
            raw.close()
        got = [m for m in got if m != b"hello"]
        deadline = time.monotonic() + 20
        while len(got) < len(sent):
            got += sub.drain(0.5)
            assert time.monotonic() < deadline, f"only {len(got)} of {len(sent)} arrived"
        assert got == sent
    finally:
        sub.close()
        reader.close()
        publisher.close()
