"""The engine for coroutines: the same decisions as ``engine/``, awaited.

Nothing here decides anew: the waiting machine is ``Waiting.steps``, herd
mode's sorting and claims are ``Herd``'s, the stampede path's judgements
are ``Coordinator``'s. What differs is who waits: a coroutine waits on its
loop (an ``asyncio.Event`` set by the loop's wake-up subscription), and the
coroutines of one loop coalesce in an ``AsyncSingleFlight``.
"""
