"""Analyses built on the library: correlation, calibration, stress and audit pipelines."""
