-- Atomic INCRBY that, unlike the bare command, does not create a missing key
-- (Django's incr() raises ValueError for one). Returns nil when the key is
-- absent; Redis answers an error when the value is not a raw integer, and the
-- caller then adds in Python.
-- KEYS[1] value key; ARGV[1] delta; ARGV[2] "1" to create a missing key.
if ARGV[2] ~= "1" and redis.call("EXISTS", KEYS[1]) == 0 then
  return nil
end
return redis.call("INCRBY", KEYS[1], ARGV[1])
