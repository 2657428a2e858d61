"""Benchmarks: model size and speed, train-step throughput, the data and inference pipelines.

Python modules behind `psm model-summary` and `psm bench ...`, beside the prepared GPU scripts
(`*.sh`). Figures go to docs/benchmarks.md.
"""
