-- The hit path: a value and its remaining life, read atomically in one round
-- trip, so a reader derives the entry's age from Redis's clock alone.
-- KEYS[1] value key. Returns {value or false, PTTL}.
return {redis.call("GET", KEYS[1]), redis.call("PTTL", KEYS[1])}
