"""The prose that ships with every Python: one document, split so that what policies are fitted on is never what
they are scored on.

Why here and torch-free: the tasks' haystacks (:mod:`kvpolicies_evals.data`) and the policies' calibration
(:mod:`kvpolicies.engine.calibration`) both read it, and task data is built where no model and no torch are loaded.
The haystacks are slices that start in the document's first half and span at most 8 characters a token, so no task
of up to 8k tokens reaches its last third, the calibration text.
"""

from __future__ import annotations


def python_documentation() -> str:
    """Natural English prose from the Python documentation bundled with CPython, in a fixed order, offline
    everywhere."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def calibration_text() -> str:
    """The documentation's last third, from the first paragraph that starts there."""
    text = python_documentation()
    start = text.index("\n\n", 2 * len(text) // 3) + 2
    return text[start:]
