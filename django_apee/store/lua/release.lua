-- The fenced end of a computation, in one atomic step: store the value only
-- if the lease is still ours, free the lease, wake the waiters. A holder
-- that lost its lease writes nothing: someone newer owns the entry now, or
-- delete() invalidated it while we computed.
-- KEYS[1] value key, KEYS[2] lease key
-- ARGV[1] token, ARGV[2] wake channel, ARGV[3] "1" to write,
-- ARGV[4] payload, ARGV[5] PX in ms ("" for no expiry).
-- Returns 1 when the lease was ours, else 0.
if redis.call("GET", KEYS[2]) ~= ARGV[1] then
  return 0
end
if ARGV[3] == "1" then
  if ARGV[5] == "" then
    redis.call("SET", KEYS[1], ARGV[4])
  else
    redis.call("SET", KEYS[1], ARGV[4], "PX", ARGV[5])
  end
end
redis.call("DEL", KEYS[2])
-- A pcall: a user the ACL denies the wake channel still gets the
-- write and the lease's end above (an error would hide that they
-- happened); its waiters then wait to the lease's end.
-- "{}<name>": sharded pub/sub (Redis Cluster), SPUBLISH on
-- "<the lease key's hash tag>|<name>", a channel of this slot.
if string.sub(ARGV[2], 1, 2) == "{}" then
  local tag = string.match(KEYS[2], "^{[^}]*}") or ""
  redis.pcall("SPUBLISH", tag .. "|" .. string.sub(ARGV[2], 3), KEYS[1])
else
  redis.pcall("PUBLISH", ARGV[2], KEYS[1])
end
return 1
