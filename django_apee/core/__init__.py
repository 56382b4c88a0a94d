"""The pure core: freshness policy, the envelope, keys, breaker, single-flight.

Nothing here talks to Redis or knows Django; every decision takes its clock
and its randomness as arguments, so it is tested without a server.
"""
