"""Redis I/O without Django: the Lua scripts, leases, wake-ups, fleet counters."""
