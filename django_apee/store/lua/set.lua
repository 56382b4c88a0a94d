-- A plain set() is newer than any computation in flight: store the value and
-- revoke the lease, so the slower holder's fenced write cannot overwrite it.
-- KEYS[1] value key, KEYS[2] lease key
-- ARGV[1] payload, ARGV[2] PX in ms ("" for none), ARGV[3] "", "NX" or "XX",
-- ARGV[4] wake channel. Returns 1 when stored, else 0.
-- An entry kept past its hard timeout only for stale_if_error is absent for
-- Django: add() (NX) must be able to replace it. Its grace is the third
-- field of the envelope's metadata, read without the value, so without its
-- MAC: forged metadata can at most let add() replace the entry, which whoever
-- forged it could do anyway. The header bytes (format version 2), offsets and
-- field order below are django_apee/core/wire.py's; the test
-- tests/unit/test_wire_lua.py fails when the two disagree.
if ARGV[3] == "NX" then
  local head = redis.call("GETRANGE", KEYS[1], 0, 260)
  if string.sub(head, 1, 3) == "\193\169\2" and string.len(head) >= 5
      and bit.band(string.byte(head, 4), 16) ~= 0 then
    local ok, meta = pcall(cmsgpack.unpack,
                           string.sub(head, 6, 5 + string.byte(head, 5)))
    local grace = ok and type(meta) == "table" and tonumber(meta[3]) or 0
    local pttl = redis.call("PTTL", KEYS[1])
    if grace > 0 and pttl >= 0 and pttl <= grace then
      redis.call("DEL", KEYS[1])
    end
  end
end
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
  -- A pcall: a user the ACL denies the wake channel still gets the
  -- write and the lease's end above (an error would hide that they
  -- happened); its waiters then wait to the lease's end.
  -- "{}<name>": sharded pub/sub (Redis Cluster), SPUBLISH on
  -- "<the lease key's hash tag>|<name>", a channel of this slot.
  if string.sub(ARGV[4], 1, 2) == "{}" then
    local tag = string.match(KEYS[2], "^{[^}]*}") or ""
    redis.pcall("SPUBLISH", tag .. "|" .. string.sub(ARGV[4], 3), KEYS[1])
  else
    redis.pcall("PUBLISH", ARGV[4], KEYS[1])
  end
end
return 1
