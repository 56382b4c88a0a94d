-- Plain get and get_many: every value with its remaining life, in one atomic
-- round trip, so a reader derives each entry's age from Redis's clock alone
-- (is it past its soft timeout? past its hard one, kept only for
-- stale_if_error?). For a value that is absent, the remaining life of its
-- lease too: someone is computing it, and the reader can wait for that
-- write instead of computing the same value again.
-- KEYS[1..n] value keys, KEYS[n+1..2n] their lease keys.
-- Returns {value or false, PTTL, lease PTTL (-2 when not looked at), ...}.
local n = #KEYS / 2
local found = {}
for i = 1, n do
  local value = redis.call("GET", KEYS[i])
  found[3 * i - 2] = value
  found[3 * i - 1] = redis.call("PTTL", KEYS[i])
  if value then
    found[3 * i] = -2
  else
    found[3 * i] = redis.call("PTTL", KEYS[n + i])
  end
end
return found
