"""The engine: what runs inside the model while it generates.

Budgets and their allocation (``budget``), the policy interface (``policy``, ``composition`` for wrappers),
selection of the kept entries (``selection``), the signals a policy may read (``signals``) and the model facts it
may need (``layer_view``), which layers a model windows (``layout``), the compressed cache (``cache``: eviction;
``storage``: one layer's layout) and the attention that reads it (``attention``). Everything here runs inside a
forward pass; nothing here knows about tasks, sweeps, pages or measurements.
"""
