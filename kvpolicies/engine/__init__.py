"""The engine: what runs inside the model while it generates.

Budgets and their allocation, the policy interface, selection of the kept entries, the signals a policy may read,
the compressed cache (storage layout and eviction) and the attention that reads it. Everything here is needed to
compress one forward pass; nothing here knows about tasks, sweeps or pages.
"""
