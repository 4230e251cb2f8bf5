"""Bundled flows (``.safetensors`` + model cards), installed as ``robustness_diag.checkpoints`` package data."""
