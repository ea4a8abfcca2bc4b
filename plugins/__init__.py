"""Built-in policies, installed as ``kvpolicies_plugins`` and registered through the ``kvpolicies`` entry points."""
