"""Skiplock's benchmarks: `python -m bench` (or `make bench`). See docs/benchmarks.md.

Kept free of imports: `bench.celery_app` and `bench.celery_side` run in the separate Celery
environment (bench/.venv), which has neither Django nor Skiplock installed.
"""
