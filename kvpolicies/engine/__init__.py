"""The engine: what runs inside the model while it generates.

Budgets and their allocation (``budget``), the policy interface (``policy``, ``composition`` for wrappers),
selection of the kept entries (``selection``), the signals a policy may read (``signals``) and the model facts it
may need (``layer_view``), which layers a model windows (``layout``), the compressed cache (``cache``: eviction;
``storage``: one layer's layout; ``codecs``: how an entry is stored; ``residual`` and ``runs``: a grouped codec's
stored form, and cutting packed runs), the attention that reads it (``attention``; ``paths``: which way a device
runs ragged layers), the after-prefill stage that chooses over every layer at once (``stages``), what a policy fits
to the model once (``calibration``), one prefill replayed into many caches (``replay``) and many caches decoded as
the rows of one batch (``rows``); ``clock`` and ``memory`` read the time and the peak memory of work on a device.
Everything here runs inside a forward pass or between two; nothing here knows about tasks, sweeps or pages.
"""
