"""Measuring policies: sweep grids and their result records, benchmarks of memory and speed, analyses and probes of
a model's attention."""
