-- Try to take an entry's lease, and say what the caller needs next in the
-- same round trip: whether it holds the lease, how long the current lease has
-- left (a waiter times its wait to it: a dead holder sends no wake-up), the
-- value with its PTTL (it may have landed since the caller last looked), and
-- the current holder's token (it names the holder's Redis client id, which
-- the waiter may check: CLIENT is not allowed in scripts).
-- A takeover: given ARGV[3], the token of a holder whose client is gone,
-- replace the lease if, and only if, it is still that token (a
-- compare-and-swap: of many waiters that found it dead, one takes it; a
-- holder that renewed or released meanwhile keeps what is its).
-- KEYS[1] value key, KEYS[2] lease key
-- ARGV[1] token, ARGV[2] lease ms, ARGV[3] dead holder's token or "".
-- Returns {held: 0 no, 1 taken, 2 taken over; lease PTTL; value or false;
--          value PTTL; holder's token (only when held is 0)}.
local held = 0
if redis.call("SET", KEYS[2], ARGV[1], "NX", "PX", ARGV[2]) then
  held = 1
elseif ARGV[3] and ARGV[3] ~= "" and redis.call("GET", KEYS[2]) == ARGV[3] then
  redis.call("SET", KEYS[2], ARGV[1], "PX", ARGV[2])
  held = 2
end
local reply = {held, redis.call("PTTL", KEYS[2]), redis.call("GET", KEYS[1]),
               redis.call("PTTL", KEYS[1])}
if held == 0 then
  reply[5] = redis.call("GET", KEYS[2])
end
return reply
