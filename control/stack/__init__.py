"""``mqserve start|stop|status``: the launcher (``launcher``), the child processes of a
stack and how they are started and stopped (``children``), the restart policy
(``restart``), and ``scripts/gpu-check``'s probe (``gpu_check``).
"""
