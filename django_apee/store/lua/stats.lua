-- Add one process's batch of counts to the fleet's totals and to the bucket
-- of the current minute, by Redis's clock (see fleet.py for the layout).
-- KEYS[1] totals hash; the minute bucket is KEYS[1] .. ":m:<minute>" and
-- shares its hash tag, so its slot. ARGV[1] bucket lifetime in seconds, then
-- field, amount pairs. The totals also keep "_since", the Unix second of the
-- first flush, so rates over a young fleet divide by its real age. Returns
-- the minute.
local now = redis.call("TIME")
redis.call("HSETNX", KEYS[1], "_since", now[1])
local minute = math.floor(tonumber(now[1]) / 60)
local bucket = KEYS[1] .. ":m:" .. minute
for i = 2, #ARGV, 2 do
  redis.call("HINCRBY", KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call("HINCRBY", bucket, ARGV[i], ARGV[i + 1])
end
redis.call("EXPIRE", bucket, ARGV[1])
return minute
