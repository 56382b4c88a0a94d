-- Plain get and get_many: every value with its remaining life, in one atomic
-- round trip, so a reader derives each entry's age from Redis's clock alone
-- (is it past its soft timeout? past its hard one, kept only for
-- stale_if_error?).
-- KEYS value keys. Returns {value or false, PTTL, value or false, PTTL, ...}.
local found = {}
for i, key in ipairs(KEYS) do
  found[2 * i - 1] = redis.call("GET", key)
  found[2 * i] = redis.call("PTTL", key)
end
return found
