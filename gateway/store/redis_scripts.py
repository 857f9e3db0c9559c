"""The Lua scripts of the Redis task store (gateway/store/redis.py, whose docstring gives the
key layout): the steps that must read before they write. Every key a script touches it is
handed or computes from a prefix it is handed."""

from __future__ import annotations

__all__ = ["LOAD", "OVER", "RELEASE", "TAKE_OPEN", "TRIM", "WRITE"]

# Scripts hand a command at most 4,000 values of a table (SADD, SREM, ZADD, DEL): Lua's
# ``unpack`` fails past its C stack (8,000 values in Redis's Lua 5.1).

# KEYS[1]: claim, KEYS[2]: state, KEYS[3]: finished, KEYS[4]: the replica's open list (or any
# key, unused); ARGV[1]: the record's tag.
RELEASE = """
local held, tag = redis.call('GET', KEYS[1]), ARGV[1]
if held and string.sub(held, 1, #tag) == tag then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[3], tag .. KEYS[1])
  redis.call('SREM', KEYS[4], tag .. KEYS[1])
end
return 0
"""

# KEYS[1]: a dead replica's open list, KEYS[2]: the taker's own; ARGV[1]: the open ttl (ms).
# The dead one's members, moved into the taker's list: whoever moves them runs them, and a
# takeover done again (by this or another replica) finds none to run twice.
TAKE_OPEN = """
local members = redis.call('SMEMBERS', KEYS[1])
for i = 1, #members, 4000 do
  redis.call('SADD', KEYS[2], unpack(members, i, math.min(i + 3999, #members)))
end
if #members > 0 then
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[1])
end
return members
"""

# KEYS[1]: claim; ARGV[1]: the state keys' prefix. {claim, state} ({claim} with no state yet),
# or false for no claim or a bare one.
LOAD = """
local held = redis.call('GET', KEYS[1])
if not held then return false end
local n = string.byte(held) + 1
if #held == n then return false end
return {held, redis.call('GET', ARGV[1] .. string.sub(held, 2, n))}
"""

# Past ``cap``, the finished set's earliest with their keys: each claim only while it is still
# theirs (a taskUUID whose claim lapsed may have been claimed again by another task).
# ``finished``, ``cap`` and ``prefix`` (the state keys') are the script's.
POP = """
local over = redis.call('ZCARD', finished) - cap
if over > 0 then
  local popped, tags, claims = redis.call('ZPOPMIN', finished, over), {}, {}
  for i = 1, #popped, 2 do
    local member = popped[i]
    local n = string.byte(member) + 1
    tags[#tags + 1] = string.sub(member, 1, n)
    claims[#claims + 1] = string.sub(member, n + 1)
  end
  for i = 1, #claims, 2000 do  -- two keys each to delete
    local last = math.min(i + 1999, #claims)
    local held, doomed = redis.call('MGET', unpack(claims, i, last)), {}
    for j = i, last do
      local tag, value = tags[j], held[j - i + 1]
      doomed[#doomed + 1] = prefix .. string.sub(tag, 2)
      if value and string.sub(value, 1, #tag) == tag then doomed[#doomed + 1] = claims[j] end
    end
    redis.call('DEL', unpack(doomed))
  end
end
"""

# The end of a script that finished records: ``ended`` holds them as (score, member) pairs,
# ``now`` is Redis's time (microseconds), ``retention`` (ms) the script's. The finished set
# takes them, drops what its retention let go (those keys expired by themselves), and pops
# what is past the count bound.
TRIM = (
    """
for i = 1, #ended, 4000 do
  redis.call('ZADD', finished, unpack(ended, i, math.min(i + 3999, #ended)))
end
redis.call('ZREMRANGEBYSCORE', finished, '-inf', string.format('(%d', now - retention * 1000))
"""
    + POP
)

# The finished set past ``max_retained`` (a flush's plain ``ZADD`` left it so), popped down to
# ``slack`` under it, so that the next writes need no pop. KEYS[1]: the finished set; ARGV:
# max_retained, the slack, the state keys' prefix.
OVER = (
    """
local finished, cap, prefix = KEYS[1], tonumber(ARGV[1]) - tonumber(ARGV[2]), ARGV[3]
"""
    + POP
    + """
return 0
"""
)

# What a flush cannot write blind (its plain commands write the rest): records written whole (not in
# Redis yet, or not known to be), and final records with a retention of 0, which are deleted.
# KEYS[1]: the finished set; ARGV: retention (ms), max_retained, open ttl (ms), the replica's
# open list ('' for none), the state keys' prefix, the records' kinds (a string, one letter
# each: O/F whole, open/final; f final, its state alone), then for each record its member (tag
# .. claim key), its state, and for one written whole its static part. Written whole, a record
# takes its claim back where Redis lost it, or completes its own (a bare claim, a record taken
# over), never another task's: then it is written nowhere.
WRITE = (
    """
local finished, retention, cap, ttl = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local index, prefix, kinds = ARGV[4], ARGV[5], ARGV[6]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local stamp, listed, unlisted, ended, gone = string.format('%d', now), {}, {}, {}, {}
local i = 7
for k = 1, #kinds do
  local kind, member, state, static = string.byte(kinds, k), ARGV[i], ARGV[i + 1], nil
  if kind == 102 then i = i + 2 else static = ARGV[i + 2]; i = i + 3 end  -- f: no static
  local n = string.byte(member) + 1
  local tag, claim = string.sub(member, 1, n), string.sub(member, n + 1)
  local final = kind ~= 79  -- O
  if final and retention <= 0 then
    local held = redis.call('GET', claim)
    if held and string.sub(held, 1, n) == tag then redis.call('DEL', claim) end
    redis.call('DEL', prefix .. string.sub(tag, 2))
    gone[#gone + 1] = member
  else
    local expiry = ttl
    if final then expiry = ARGV[1] end
    local ours = redis.call('SET', claim, tag .. static, 'NX', 'PX', expiry)
    if not ours and string.sub(redis.call('GET', claim), 1, n) == tag then
      ours = redis.call('SET', claim, tag .. static, 'PX', expiry)
    end
    if ours then
      redis.call('SET', prefix .. string.sub(tag, 2), state, 'PX', expiry)
      if final then
        unlisted[#unlisted + 1] = member
        ended[#ended + 1] = stamp
        ended[#ended + 1] = member
      else
        listed[#listed + 1] = member
      end
    end
  end
end
if index ~= '' then
  for _, members in ipairs({gone, unlisted}) do
    for j = 1, #members, 4000 do
      redis.call('SREM', index, unpack(members, j, math.min(j + 3999, #members)))
    end
  end
  for j = 1, #listed, 4000 do
    redis.call('SADD', index, unpack(listed, j, math.min(j + 3999, #listed)))
  end
  if #listed > 0 then redis.call('PEXPIRE', index, ttl) end
end
for j = 1, #gone, 4000 do
  redis.call('ZREM', finished, unpack(gone, j, math.min(j + 3999, #gone)))
end
if #ended > 0 then
"""
    + TRIM
    + """
end
return 0
"""
)
