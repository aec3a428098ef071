"""mqserve's model workers and the per-host supervisor that reconciles them.

``reconcile`` decides (a pure function), ``supervisor`` applies the decisions to real
processes, and each worker process loads one model version and consumes its queue.
"""
