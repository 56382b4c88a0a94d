-- Extend a lease only while it is still ours. A holder that lost its lease
-- (it expired during a pause, or delete() revoked it) must not revive it.
-- KEYS[1] lease key; ARGV[1] token, ARGV[2] lease ms. Returns 1 or 0.
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("PEXPIRE", KEYS[1], ARGV[2])
end
return 0
