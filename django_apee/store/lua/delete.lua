-- Delete a value and revoke any lease on it, so a computation that started
-- before this invalidation cannot write pre-invalidation data back (the
-- "stale set" problem). Waiters are woken to look again.
-- KEYS[1] value key, KEYS[2] lease key; ARGV[1] wake channel.
-- Returns the number of value keys deleted (0 or 1).
local deleted = redis.call("DEL", KEYS[1])
if redis.call("DEL", KEYS[2]) == 1 then
  -- A pcall: a user the ACL denies the wake channel still gets the
  -- write and the lease's end above (an error would hide that they
  -- happened); its waiters then wait to the lease's end.
  -- "{}<name>": sharded pub/sub (Redis Cluster), SPUBLISH on
  -- "<the lease key's hash tag>|<name>", a channel of this slot.
  if string.sub(ARGV[1], 1, 2) == "{}" then
    local tag = string.match(KEYS[2], "^{[^}]*}") or ""
    redis.pcall("SPUBLISH", tag .. "|" .. string.sub(ARGV[1], 3), KEYS[1])
  else
    redis.pcall("PUBLISH", ARGV[1], KEYS[1])
  end
end
return deleted
