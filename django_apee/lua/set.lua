-- A plain set() is newer than any computation in flight: store the value and
-- revoke the lease, so the slower holder's fenced write cannot overwrite it.
-- KEYS[1] value key, KEYS[2] lease key
-- ARGV[1] payload, ARGV[2] PX in ms ("" for none), ARGV[3] "", "NX" or "XX",
-- ARGV[4] wake channel. Returns 1 when stored, else 0.
local command = {"SET", KEYS[1], ARGV[1]}
if ARGV[2] ~= "" then
  table.insert(command, "PX")
  table.insert(command, ARGV[2])
end
if ARGV[3] ~= "" then
  table.insert(command, ARGV[3])
end
if not redis.call(unpack(command)) then
  return 0
end
if redis.call("DEL", KEYS[2]) == 1 then
  redis.call("PUBLISH", ARGV[4], KEYS[1])
end
return 1
