"""The per-host supervisor: the pure decision (``plan``), the loop that observes and
applies it (``loop``), starting and adopting worker processes (``spawn``) and running a
supervisor as a process (``run``: ``mqserve supervisor``).
"""
