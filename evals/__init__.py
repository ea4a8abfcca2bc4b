"""Evaluation data and lm-eval tasks of kvpolicies, installed as ``kvpolicies_evals``."""
