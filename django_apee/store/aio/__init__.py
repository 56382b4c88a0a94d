"""The store on ``redis.asyncio``: the same scripts, leases and wake-ups as
the sync store, for coroutines that must not hold a thread while they wait."""
