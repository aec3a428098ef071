"""Benchmarks of any TorchServe-compatible server (mqserve or TorchServe itself).

Run through ``scripts/bench``; :mod:`bench.cli` lists the subcommands. Only the standard
library is used, so the same code measures a server installed anywhere.
"""
