"""Batch jobs: the job store in Redis and its Celery chunks (``store``), the REST API on
8080 (``api``) and the Python and ``mqserve batch`` client (``client``).
"""
