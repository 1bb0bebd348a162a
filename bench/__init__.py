"""Benchmarks of sparse-attn against dense and sparse baselines, measured side by side in one run.

Each benchmark writes ``<name>.json`` (device, versions, commit, settings, results) and ``<name>.md`` rendered from
that JSON; ``python -m bench.report`` re-renders tables from stored results.
"""
