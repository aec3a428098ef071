"""One model worker process (``python -m workers.worker.process``): the process wiring
(``process``), the online request loop (``serving``), the heartbeat and lease guard
(``heartbeat``), the Celery tasks (``tasks``, with the guarded transport ``broker`` and
the task message format ``messages``) and batch-job chunks (``batch``).
"""
