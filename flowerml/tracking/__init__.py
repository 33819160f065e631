"""Mirroring flowerml to an MLflow tracking server: training runs as MLflow runs (params, step
metrics, tags, the evaluation's figures and files) and registry versions and aliases as MLflow
model versions and aliases.

MLflow is optional (`pip install 'flowerml[mlflow]'`): only this package imports it, lazily,
when a tracking URI is given. It sits just above `io` and imports nothing of the later stages:
training, evaluation and the registry hand it plain values (events, dicts, file paths).
flowerml's own files and registry stay the source of truth; the mirror follows them.
"""
