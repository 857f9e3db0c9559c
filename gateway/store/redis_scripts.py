"""The Lua scripts of the Redis task store (gateway/store/redis.py, whose docstring gives the
key layout): the steps that must read before they write. Every key a script touches it is
handed or computes from a prefix it is handed."""

from __future__ import annotations

__all__ = ["OVER", "RELEASE", "TAKE_OPEN", "WRITE"]

# Scripts hand a command at most 4,000 values of a table (SADD, SREM, RPUSH, DEL): Lua's
# ``unpack`` fails past its C stack (8,000 values in Redis's Lua 5.1).

# KEYS[1]: the claim, KEYS[2]: the replica's open list (or any key, unused); ARGV[1]: the
# record's tag. An open record's: it is on no finished list. Its member goes even where the
# claim lapsed (or is another task's now): a member is its record's alone (tag and key).
RELEASE = """
local held, tag = redis.call('GET', KEYS[1]), ARGV[1]
if held and string.sub(held, 1, #tag) == tag then
  redis.call('DEL', KEYS[1])
end
redis.call('SREM', KEYS[2], tag .. KEYS[1])
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

# Past ``cap``, the finished list's oldest with their keys: each only while it is still theirs
# (a taskUUID whose claim lapsed may have been claimed again by another task). ``finished``
# and ``cap`` are the script's.
POP = """
local over = redis.call('LLEN', finished) - cap
while over > 0 do
  local popped = redis.call('LPOP', finished, math.min(over, 4000))
  over = over - #popped
  local tags, keys, doomed = {}, {}, {}
  for i, member in ipairs(popped) do
    local n = string.byte(member) + 1
    tags[i], keys[i] = string.sub(member, 1, n), string.sub(member, n + 1)
  end
  local held = redis.call('MGET', unpack(keys))
  for i, value in ipairs(keys) do
    if held[i] and string.sub(held[i], 1, #tags[i]) == tags[i] then doomed[#doomed + 1] = value end
  end
  if #doomed > 0 then redis.call('DEL', unpack(doomed)) end
end
"""

# The finished list past ``max_retained`` (a flush's plain ``RPUSH`` left it so), popped down
# to ``slack`` under it, so that the next writes need no pop. KEYS[1]: the finished list;
# ARGV: max_retained, the slack.
OVER = (
    """
local finished, cap = KEYS[1], tonumber(ARGV[1]) - tonumber(ARGV[2])
"""
    + POP
    + """
return 0
"""
)

# What a flush cannot write blind (its plain commands write the rest): records written whole
# (not in Redis yet, or not known to be), and final records with a retention of 0, which are
# deleted. KEYS[1]: the finished list; ARGV: retention (ms), max_retained, open ttl (ms), the
# replica's open list ('' for none), the records' kinds (a string, one letter each: O/F whole,
# open/final; f final, with a retention of 0), then for each record its member (tag .. key) and
# its value after the tag (mark, record). Written whole, a record takes its claim back where
# Redis lost it, or completes its own (a bare claim, a record taken over), never another
# task's: then it is written nowhere. A final one is listed finished unless its mark says it
# was (a delivery's outcome after the task ended).
WRITE = (
    """
local finished, retention, cap, ttl = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local index, kinds = ARGV[4], ARGV[5]
local listed, unlisted, ended, gone = {}, {}, {}, {}
for k = 1, #kinds do
  local kind, member, record = string.byte(kinds, k), ARGV[4 + 2 * k], ARGV[5 + 2 * k]
  local n = string.byte(member) + 1
  local tag, key = string.sub(member, 1, n), string.sub(member, n + 1)
  local final = kind ~= 79  -- O
  local held = redis.call('GET', key)
  local ours = held and string.sub(held, 1, n) == tag
  if final and retention <= 0 then
    if ours then redis.call('DEL', key) end
    gone[#gone + 1] = member
  elseif ours or not held then
    local expiry = ttl
    if final then expiry = ARGV[1] end
    redis.call('SET', key, tag .. record, 'PX', expiry)
    if final then
      unlisted[#unlisted + 1] = member
      if not (ours and string.sub(held, n + 1, n + 1) == 'f') then ended[#ended + 1] = member end
    else
      listed[#listed + 1] = member
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
for j = 1, #ended, 4000 do
  redis.call('RPUSH', finished, unpack(ended, j, math.min(j + 3999, #ended)))
end
"""
    + POP
    + """
return 0
"""
)
