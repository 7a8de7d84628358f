"""Rate-limit state in Redis (ports.RateLimitStore), shared by a fleet of instances.

A Lua script admits a request against all its keys, or against none: Redis
runs a script atomically, so no other command sees a half-applied request
(the GCRA in Lua after rwz/redis-gcra's ``perform_gcra_ratelimit.lua``, taken
to several keys at once).  Each key holds its theoretical arrival time as a
decimal string and expires when that time has passed (``PX``), so idle keys
cost nothing.  ``now`` is Redis's own clock (``TIME``) with ``server_clock``
(how the service runs): one clock for the whole fleet, so that an instance
whose clock is off cannot write arrival times the others read as far in the
future (an outside fault campaign had one instance 60 s ahead make every
instance answer 429 for most of a minute, and one 60 s behind refuse
everything itself); otherwise the caller's clock, which lets tests move time.

A TAT further ahead than the key's tolerance allows (written under an earlier, stricter
limit) is read as ``now + tolerance``, and written back so on a refusal
(:func:`~sts.core.rate_limit.gcra_start`): the next request waits one interval of the
current limit, not out the old limit's state (an outside audit had a /24 refused for
110 s after its limit was raised to the default).  A capped key always refuses, so the
admission is what it was; Redis's clock (``server_clock``) is one for the fleet, so a TAT
that far ahead cannot come from another instance's clock.

One round trip per check (``EVALSHA``; the script is loaded once).  Every key
of one call must live on the same Redis node: this service uses one Redis
(no cluster), so they do.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from ...core.ports import LimitedKey, StoreUnavailable
from .client import LuaScript, commands

#: KEYS: the limited keys.  ARGV[1]: now (seconds), or ``server`` for Redis's clock; then per key:
#: interval, tolerance.  Returns every key's wait in seconds, as strings (Redis would truncate
#: numbers to integers).  (``TIME`` in a script: Redis 7 replicates a script's effects.)
GCRA_SCRIPT = """
local now
if ARGV[1] == 'server' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local waits, tats, capped = {}, {}, {}
local refused = false
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i])
  local tolerance = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  if tat > now + tolerance then
    tat = now + tolerance
    capped[i] = tat
  end
  tats[i] = tat + interval
  local wait = tats[i] - tolerance - now
  if wait > 0 then refused = true end
  waits[i] = string.format('%.6f', wait)
end
if not refused then
  for i, key in ipairs(KEYS) do
    local ttl = math.max(1, math.ceil((tats[i] - now) * 1000))
    redis.call('SET', key, string.format('%.6f', tats[i]), 'PX', ttl)
  end
else
  for i, key in ipairs(KEYS) do
    if capped[i] then
      local ttl = math.max(1, math.ceil((capped[i] - now) * 1000))
      redis.call('SET', key, string.format('%.6f', capped[i]), 'PX', ttl)
    end
  end
end
return waits
"""


class RedisRateLimits:
    """ports.RateLimitStore on Redis."""

    def __init__(self, client: redis.Redis, *, prefix: str = "sts", server_clock: bool = False) -> None:
        self.client = client
        self.prefix = prefix
        self.server_clock = server_clock
        self._script = LuaScript(commands(client), GCRA_SCRIPT)

    def _name(self, key: str) -> bytes:
        return f"{self.prefix}:ratelimit:{key}".encode("utf-8", "surrogatepass")

    def acquire(self, keys: Sequence[LimitedKey], now: float) -> Sequence[float]:
        args: list[str] = ["server" if self.server_clock else repr(float(now))]
        for k in keys:
            args.extend((repr(float(k.interval)), repr(float(k.tolerance))))
        try:
            waits = self._script(keys=[self._name(k.key) for k in keys], args=args)
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return [float(w) for w in waits]
