"""The one Redis connection of a store, and the rules that keep a bad Redis out of predictions.

* Every call is bounded by ``timeout_s`` (socket timeouts *and* an asyncio timeout around the
  whole call, so a pipeline of several round trips or a connect that half-succeeds is bounded
  too). redis-py's own retries are off: a retry would double the worst case.
* The first failed call marks Redis *down*. While down, calls are not attempted at all - they
  return their fallback at once - so a dead Redis costs nothing per request and there is no
  reconnect storm. One background task PINGs every ``down_interval_s`` and marks Redis *up*
  again when it answers (and PINGs every ``up_interval_s`` while up, so the gauge is right
  even without traffic).
* Each transition is logged once and sets the ``redis_up`` gauge; each failed call counts
  ``redis_error(operation)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import DataError, RedisError, ResponseError

from nacguard.store.base import NullMetrics, StoreMetrics

__all__ = ["RedisLink", "redact_url"]

logger = logging.getLogger("nacguard.store")

T = TypeVar("T")

#: Connections per replica. Requests wait (up to the call timeout) for a free one rather than
#: opening more: under a burst, a bounded pool keeps one replica from exhausting Redis's clients.
MAX_CONNECTIONS = 32


def redact_url(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


class RedisLink:
    """A Redis client plus its up/down state.

    Args:
        url: ``redis://[user:password@]host:port/db`` (a malformed URL raises ``ValueError``
            here: that is a configuration error, unlike an unreachable server).
        timeout_s: bound on every call.
        metrics: receives ``set_redis_up`` and ``redis_error``.
        down_interval_s: PING period while Redis is down (how soon recovery is noticed).
        up_interval_s: PING period while Redis is up.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        metrics: StoreMetrics | None = None,
        down_interval_s: float = 1.0,
        up_interval_s: float = 5.0,
    ) -> None:
        self._url = redact_url(url)
        self._timeout_s = timeout_s
        self._metrics = metrics or NullMetrics()
        self._down_interval_s = down_interval_s
        self._up_interval_s = up_interval_s
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            # No CLIENT SETINFO round trips on each new connection.
            driver_info=None,
        )
        self._client: Redis = Redis.from_pool(pool)
        self._up: bool | None = None  # None until start() has asked Redis once
        self._watcher: asyncio.Task[None] | None = None
        self._reported: set[tuple[str, str]] = set()
        self._state_changed = asyncio.Event()

    @property
    def up(self) -> bool:
        """Whether calls currently go to Redis."""
        return bool(self._up)

    @property
    def url(self) -> str:
        """The URL, password redacted."""
        return self._url

    async def start(self) -> None:
        """PING once (bounded by the timeout) and start the health task. Never raises because
        Redis is unreachable: the store then starts degraded and recovers when Redis answers."""
        if self._watcher is not None:
            return
        await self._check()
        self._watcher = asyncio.create_task(self._watch(), name="nacguard-redis-health")

    async def close(self) -> None:
        """Stop the health task and close every connection."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    async def call(self, operation: str, fn: Callable[[Redis], Awaitable[T]], fallback: T) -> T:
        """``await fn(client)`` within the timeout, or ``fallback`` when Redis is down or fails.

        Args:
            operation: short fixed name for the ``redis_error`` metric (e.g. ``cache_get``).
            fn: the Redis work; may be several commands (a pipeline is one round trip).
            fallback: what to return instead of raising.
        """
        if not self._up:
            return fallback
        try:
            async with asyncio.timeout(self._timeout_s):
                return await fn(self._client)
        except (ResponseError, DataError) as exc:
            # Redis answered (or was never asked), so it is up; the command itself was wrong
            # (e.g. WRONGTYPE on a key another program wrote). Logged once per kind.
            self._metrics.redis_error(operation)
            kind = (operation, str(exc).split(" ")[0])
            if kind not in self._reported:
                self._reported.add(kind)
                logger.error("redis rejected %s: %s", operation, exc)
            return fallback
        except (RedisError, OSError, TimeoutError) as exc:
            self._metrics.redis_error(operation)
            self._set_up(False, f"{operation}: {type(exc).__name__}: {exc}")
            return fallback

    async def _watch(self) -> None:
        while True:
            self._state_changed.clear()
            try:
                async with asyncio.timeout(
                    self._up_interval_s if self._up else self._down_interval_s
                ):
                    await self._state_changed.wait()
            except TimeoutError:
                try:
                    await self._check()
                except Exception:  # the health task must outlive any surprise
                    logger.exception("redis health check failed unexpectedly")
            # else: a call just marked Redis down; restart the wait with the down interval, so
            # recovery is noticed within down_interval_s rather than after a long up interval.

    async def _check(self) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            if self._up:
                self._metrics.redis_error("ping")
            self._set_up(False, f"ping: {type(exc).__name__}: {exc}")
            return
        if not self._up:
            # Idle connections may date from before the outage (a restarted server closed
            # them); drop them so the first calls after recovery don't fail on them.
            await self._client.connection_pool.disconnect(inuse_connections=False)
            self._set_up(True, "")

    def _set_up(self, up: bool, reason: str) -> None:
        if self._up is up:
            return
        first = self._up is None
        self._up = up
        self._state_changed.set()
        self._metrics.set_redis_up(up)
        if up:
            logger.info("redis at %s %s", self._url, "connected" if first else "is back")
        else:
            logger.warning(
                "redis at %s %s (%s); serving without it (cache misses, local drift window) "
                "and checking every %.1fs",
                self._url,
                "unreachable at start-up" if first else "went away",
                reason,
                self._down_interval_s,
            )
