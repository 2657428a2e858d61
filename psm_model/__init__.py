"""HRNet-PSM pose model: torch only, importable and testable without Ray.

Import from the modules (psm_model.hrnet, psm_model.config, ...): this package imports nothing
itself, so the modules that need no torch (config, geometry, files, evaluation) load without it,
as the detector actors do (docs/benchmarks.md).
"""
