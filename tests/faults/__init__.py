"""Fault and multi-process tests: child processes, SIGKILL, SIGSTOP; slow.

Every test here is marked ``faults``; ``pytest -m "not faults"`` skips them.
"""
