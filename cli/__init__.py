"""The robustness-diag command line."""
