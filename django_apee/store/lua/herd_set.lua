-- The write of a caller that won an entry's lease from a plain get (herd
-- mode): store only if that lease is still ours, free it, wake the waiters.
-- If the lease ran out (herd leases are not renewed: nobody knows when the
-- caller will write), the write still lands when the entry is exactly what
-- the caller saw when it won, by the SHA-1 of its bytes. Otherwise something
-- newer happened meanwhile (a set, a delete, another winner) and nothing is
-- written: no pre-invalidation data comes back.
-- KEYS[1] value key, KEYS[2] lease key
-- ARGV[1] token, ARGV[2] SHA-1 of the value when won ("" = it was absent:
-- then only the lease counts), ARGV[3] payload, ARGV[4] PX in ms ("" for
-- none), ARGV[5] wake channel. Returns 1 when stored, else 0.
local lease = redis.call("GET", KEYS[2])
local ours = lease == ARGV[1]
if not ours then
  if lease or ARGV[2] == "" then
    return 0
  end
  local current = redis.call("GET", KEYS[1])
  if not current or redis.sha1hex(current) ~= ARGV[2] then
    return 0
  end
end
if ARGV[4] == "" then
  redis.call("SET", KEYS[1], ARGV[3])
else
  redis.call("SET", KEYS[1], ARGV[3], "PX", ARGV[4])
end
if ours then
  redis.call("DEL", KEYS[2])
end
-- A pcall: a user the ACL denies the wake channel still gets the
-- write and the lease's end above (an error would hide that they
-- happened); its waiters then wait to the lease's end.
-- "{}<name>": sharded pub/sub (Redis Cluster), SPUBLISH on
-- "<the lease key's hash tag>|<name>", a channel of this slot.
if string.sub(ARGV[5], 1, 2) == "{}" then
  local tag = string.match(KEYS[2], "^{[^}]*}") or ""
  redis.pcall("SPUBLISH", tag .. "|" .. string.sub(ARGV[5], 3), KEYS[1])
else
  redis.pcall("PUBLISH", ARGV[5], KEYS[1])
end
return 1
