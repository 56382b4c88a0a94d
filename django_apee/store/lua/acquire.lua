-- Try to take an entry's lease, and say what the caller needs next in the
-- same round trip: whether it holds the lease, how long the current lease has
-- left (a waiter times its wait to it: a dead holder sends no wake-up), and
-- the value with its PTTL (it may have landed since the caller last looked).
-- KEYS[1] value key, KEYS[2] lease key; ARGV[1] token, ARGV[2] lease ms.
local held = 0
if redis.call("SET", KEYS[2], ARGV[1], "NX", "PX", ARGV[2]) then
  held = 1
end
return {held, redis.call("PTTL", KEYS[2]), redis.call("GET", KEYS[1]),
        redis.call("PTTL", KEYS[1])}
