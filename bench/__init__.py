"""Benchmarks (not tests): ``python -m bench [NAME ...]`` runs ``bench/bench_NAME.py``."""
