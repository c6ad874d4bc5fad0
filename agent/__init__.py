# The pulsebridge hub agent (CPython, asyncio).
