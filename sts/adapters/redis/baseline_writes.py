"""How a baseline is written on Redis: a grant's update, or a whole baseline (``sts baseline``).

An identity's baseline is a few keys with one expiry: the baseline's JSON, its counters
(:func:`counts_name`, :mod:`sts.core.baseline_counts`), its drift state (:func:`drift_name`,
written by a grant only when it changed it) and its recent refusals (never written here).  A
grant's counters are advanced from the stored ones by one grant in the script that writes them
(:data:`WRITE_BASELINE`, the rule of :func:`sts.core.baseline_counts.advanced`), so that grants
decided at once each count; every other write sets them as given.  The single-use ledger's
confirmation script writes a grant's update with its uses (:mod:`.ledger`);
:meth:`~.key_value.RedisBaselineStore.save` otherwise.
"""

from __future__ import annotations

from ...core.baseline import RATE_WINDOW
from ...core.baseline_counts import KEEP, RESET, TAKE, counts_of, counts_text
from ...core.drift import drift_to_json
from ...core.ports import BaselineUpdate


def baseline_name(prefix: str, identity: str) -> bytes:
    """The key of an identity's baseline (also written by the single-use ledger's confirmation)."""
    return f"{prefix}:baseline:{identity}".encode("utf-8", "surrogatepass")


def drift_name(prefix: str, identity: str) -> bytes:
    """The key of an identity's drift state (:func:`~sts.core.drift.drift_to_json`), kept apart
    from its baseline, which the single-use ledger's confirmation writes back whole: written by a
    grant only when it changed it, by a refusal's probation step
    (:meth:`~.key_value.RedisBaselineStore.update_drift`) and by a whole baseline's write."""
    return f"{prefix}:drift:{identity}".encode("utf-8", "surrogatepass")


def counts_name(prefix: str, identity: str) -> bytes:
    """The key of an identity's counters (:func:`~sts.core.baseline_counts.counts_text`)."""
    return f"{prefix}:counts:{identity}".encode("utf-8", "surrogatepass")


#: Lua: ``write_baseline(k, a)`` sets KEYS[k] (the baseline) to ARGV[a] and KEYS[k + 1] (its
#: counters) for ARGV[a + 1] seconds; the counters are ARGV[a + 2] (``counts_text``), advanced from
#: the stored ones by a grant at ARGV[a + 3] unless that is empty (a whole baseline), the stored
#: ones count another baseline (their last word, the ``first_seen`` written with them, kept as
#: text: :func:`~sts.core.baseline_counts.same_baseline`) or are behind what the grant read (its
#: count less one); KEYS[k + 2], if given, (the drift state) is set to ARGV[a + 4].  Numbers are
#: written with 17 significant digits: read back as the same doubles.  A counters key that is not
#: a string (``pcall``) is written over.
WRITE_BASELINE = f"""
local function parse_counts(text)
  local v = {{}}
  for x in string.gmatch(text, '%S+') do v[#v + 1] = x end
  if #v ~= 5 or (v[5] ~= '-' and not tonumber(v[5])) then return nil end
  for i = 1, 4 do
    v[i] = tonumber(v[i])
    if not v[i] then return nil end
  end
  return v
end
local function write_baseline(k, a)
  local ttl = ARGV[a + 1]
  local before = redis.pcall('GET', KEYS[k])
  local reset = type(before) == 'string' and string.sub(before, 1, {len(RESET)}) == '{RESET}'
  redis.call('SET', KEYS[k], ARGV[a], 'EX', ttl)
  local new = parse_counts(ARGV[a + 2])
  local at = tonumber(ARGV[a + 3])
  local held = redis.pcall('GET', KEYS[k + 1])
  local s = nil
  if at and type(held) == 'string' then s = parse_counts(held) end
  local same = false
  if s and s[5] ~= '-' and new[5] ~= '-' then
    local near = math.abs(tonumber(s[5]) - tonumber(new[5])) <= {RATE_WINDOW!r}
    same = s[5] == new[5] or (new[1] == 1 and not reset and near)
  end
  if same and s[1] >= new[1] - 1 then
    if at - s[2] > {RATE_WINDOW!r} then
      local usual = 0
      if s[1] > 0 then usual = s[4] * {KEEP!r} + s[3] * {TAKE!r} end
      new = {{s[1] + 1, at, 1, usual, s[5]}}
    else
      new = {{s[1] + 1, s[2], s[3] + 1, s[4], s[5]}}
    end
  end
  local text = string.format('%d %.17g %d %.17g %s', new[1], new[2], new[3], new[4], new[5])
  redis.call('SET', KEYS[k + 1], text, 'EX', ttl)
  if KEYS[k + 2] then redis.call('SET', KEYS[k + 2], ARGV[a + 4], 'EX', ttl) end
end
"""


def baseline_write(
    prefix: str, update: BaselineUpdate, *, grant: bool
) -> tuple[list[bytes], list[bytes | int | str]]:
    """The keys and arguments of ``write_baseline`` for ``update`` (the drift state only if it
    changed): a grant's (its counters advanced from the stored ones) or a whole baseline."""
    baseline, identity = update.baseline, update.identity
    names = [baseline_name(prefix, identity), counts_name(prefix, identity)]
    at = baseline.last_seen if grant and baseline.last_seen is not None else None
    args: list[bytes | int | str] = [
        baseline.to_json(),
        update.ttl,
        counts_text(counts_of(baseline)),
        repr(float(at)) if at is not None else "",
    ]
    if update.drift_changed:
        names.append(drift_name(prefix, identity))
        args.append(drift_to_json(baseline))
    return names, args
