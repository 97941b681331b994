"""Fixtures shared by every test layer."""

# A tiny real profile bundle (API owner): see tests/fixtures/bundles.py.
from tests.fixtures.bundles import tiny_bundle

# Real redis-server processes (store owner): see tests/fixtures/redis_server.py.
from tests.fixtures.redis_server import hanging_redis_url, redis_server

__all__ = ["hanging_redis_url", "redis_server", "tiny_bundle"]
