-- Add one process's batch of counts to the fleet's totals and to the bucket
-- of the current minute, by Redis's clock (see fleet.py for the layout).
-- KEYS[1] totals hash, KEYS[2] the minute's bucket (KEYS[1] .. ":m:<minute>",
-- same hash tag, so same slot). The caller read Redis's TIME just before and
-- named the bucket from it: every key this script writes is declared here.
-- ARGV[1] bucket lifetime in seconds, ARGV[2] that TIME's Unix second, then
-- field, amount pairs. The totals also keep "_since", the Unix second of the
-- first flush, so rates over a young fleet divide by its real age.
redis.call("HSETNX", KEYS[1], "_since", ARGV[2])
for i = 3, #ARGV, 2 do
  redis.call("HINCRBY", KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call("HINCRBY", KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call("EXPIRE", KEYS[2], ARGV[1])
return 1
