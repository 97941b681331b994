"""Fixtures shared by every test layer."""

# Real redis-server processes (store owner): see tests/fixtures/redis_server.py.
from tests.fixtures.redis_server import hanging_redis_url, redis_server

__all__ = ["hanging_redis_url", "redis_server"]
