"""Pure tests: no Redis, no processes (the session's server may still be up)."""
