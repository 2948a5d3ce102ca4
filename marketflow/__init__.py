"""marketflow: real-time market data from TCP feeds into Redis, PostgreSQL and a live API."""

__version__ = "0.1.0"
