-- Change an entry's time to live and revoke any lease on it, atomically: a
-- computation that started before this change must not write its value
-- back with a timeout of its own over the one just set.
-- KEYS[1] value key, KEYS[2] lease key
-- ARGV[1] "PEXPIRE", "PEXPIREAT" or "PERSIST", ARGV[2] milliseconds (a
-- duration for PEXPIRE, a Unix time for PEXPIREAT; unused by PERSIST),
-- ARGV[3] wake channel.
-- Returns 1 when the entry's timeout changed, else 0 (no entry, or PERSIST
-- on one that had none); the lease is revoked only then.
local changed
if ARGV[1] == "PERSIST" then
  changed = redis.call("PERSIST", KEYS[1])
elseif ARGV[1] == "PEXPIRE" or ARGV[1] == "PEXPIREAT" then
  changed = redis.call(ARGV[1], KEYS[1], ARGV[2])
else
  return redis.error_reply("retime.lua: unknown command " .. ARGV[1])
end
if changed == 1 and redis.call("DEL", KEYS[2]) == 1 then
  -- A pcall: a user the ACL denies the wake channel still gets the
  -- change and the lease's end above; its waiters wait to the lease's end.
  -- "{}<name>": sharded pub/sub (Redis Cluster), SPUBLISH on
  -- "<the lease key's hash tag>|<name>", a channel of this slot.
  if string.sub(ARGV[3], 1, 2) == "{}" then
    local tag = string.match(KEYS[2], "^{[^}]*}") or ""
    redis.pcall("SPUBLISH", tag .. "|" .. string.sub(ARGV[3], 3), KEYS[1])
  else
    redis.pcall("PUBLISH", ARGV[3], KEYS[1])
  end
end
return changed
