"""Per-key rate limits: a fixed window of `window_s` seconds that opens with a key's first request.

Counts live in Redis when one is configured, so that every API process shares them (one atomic script:
INCR, and PEXPIRE on the window's first request), and in this process otherwise. A Redis that stops
answering never fails a request: counting falls back to this process, and Redis is tried again after
`retry_redis_after_s`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import redis
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

# KEYS[1]: the counter; ARGV[1]: the window in ms. Returns the count and the window's remaining ms.
_HIT_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if count == 1 or ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {count, ttl}
"""
_PRUNE_ABOVE = 10_000  # in-process windows kept before expired ones are dropped
RATE_LIMIT_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "Retry-After")


@dataclass(frozen=True)
class RateLimitDecision:
    """The outcome of one request's hit: within the limit or not, and the `RateLimit-*` header values."""

    limit: int
    remaining: int
    reset_s: int  # whole seconds until the window resets (at least 1)
    allowed: bool

    def headers(self) -> dict[str, str]:
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.reset_s)
        return headers


class InProcessCounter:
    """Windows counted in this process (thread-safe)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._windows: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str) -> tuple[int, float]:
        """Count a request for `key`; returns the window's count so far and its seconds left."""
        now = time.monotonic()
        with self._lock:
            start, count = self._windows.get(key, (now, 0))
            if now - start >= self.window_s:
                start, count = now, 0
            self._windows[key] = (start, count + 1)
            if len(self._windows) > _PRUNE_ABOVE:
                self._windows = {k: v for k, v in self._windows.items() if now - v[0] < self.window_s}
        return count + 1, start + self.window_s - now


class RedisCounter:
    """Windows counted in Redis, shared by every process that uses the same URL and prefix."""

    def __init__(self, url: str, window_s: float, prefix: str, timeout_s: float = 0.5) -> None:
        self.window_ms = max(1, int(window_s * 1000))
        self.prefix = prefix
        self.client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        self._script = self.client.register_script(_HIT_SCRIPT)

    def hit(self, key: str) -> tuple[int, float]:
        count, ttl_ms = self._script(keys=[f"{self.prefix}:{key}"], args=[self.window_ms])
        return int(count), int(ttl_ms) / 1000


class RateLimiter:
    """`limit` requests per key per `window_s`; 0 turns it off."""

    def __init__(
        self,
        limit: int,
        *,
        window_s: float = 60.0,
        redis_url: str = "",
        prefix: str = "distill:ratelimit",
        retry_redis_after_s: float = 30.0,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.local = InProcessCounter(window_s)
        self.redis = RedisCounter(redis_url, window_s, prefix) if redis_url and limit > 0 else None
        self.retry_redis_after_s = retry_redis_after_s
        self._redis_down_until = 0.0

    @property
    def backend(self) -> str:
        """Where counts go now: `redis`, `memory`, or `memory (redis unreachable)`."""
        if self.redis is None:
            return "memory"
        return "redis" if time.monotonic() >= self._redis_down_until else "memory (redis unreachable)"

    def _count(self, key: str) -> tuple[int, float]:
        if self.redis is not None and time.monotonic() >= self._redis_down_until:
            try:
                counted = self.redis.hit(key)
            except (RedisError, OSError) as exc:
                if self._redis_down_until == 0.0:
                    logger.warning(
                        "rate-limit Redis unreachable (%s); counting in this process, retrying every %g s",
                        exc,
                        self.retry_redis_after_s,
                    )
                self._redis_down_until = time.monotonic() + self.retry_redis_after_s
            else:
                if self._redis_down_until != 0.0:
                    logger.warning("rate-limit Redis reachable again; counts are shared again")
                    self._redis_down_until = 0.0
                return counted
        return self.local.hit(key)

    def hit(self, key: str) -> RateLimitDecision | None:
        """Count one request for `key`; None when limits are off."""
        if self.limit <= 0:
            return None
        count, seconds_left = self._count(key)
        return RateLimitDecision(
            limit=self.limit,
            remaining=max(0, self.limit - count),
            reset_s=max(1, math.ceil(seconds_left)),
            allowed=count <= self.limit,
        )
