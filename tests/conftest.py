"""Fixtures shared by every test layer."""

# The real app in-process on an httpx client (API owner): see tests/fixtures/api.py.
from tests.fixtures.api import api, make_api

# A tiny real profile bundle (API owner): see tests/fixtures/bundles.py.
from tests.fixtures.bundles import tiny_bundle

# Real redis-server processes (store owner): see tests/fixtures/redis_server.py.
from tests.fixtures.redis_server import hanging_redis_url, redis_server

__all__ = ["api", "hanging_redis_url", "make_api", "redis_server", "tiny_bundle"]
