"""Deterministic, offline evaluation data: passkey retrieval (in filler or in prose), needle in a haystack,
long-text perplexity.

Every sample is a pure function of its seed and parameters, so a task's data is the same on every machine. Lengths
are measured in tokens of the embedded model's tokenizer (any tokenizer can be passed). The natural-text haystack
is the Python documentation that ships with CPython (``pydoc_data.topics``), available offline everywhere.

``kvpolicies eval-data --out DIR`` writes the default sets as JSONL; the lm-eval tasks in ``evals/tasks`` build the
same data on first use and keep it under the user cache.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
NIAH_INTRO = "Read the following documentation carefully. A special magic number is hidden in it.\n\n"
CITIES = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Windhoek", "Reykjavik", "Da Nang", "Cusco"]

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_PER_CELL = 2
PPL_LENGTHS = (2048, 4096)
PPL_PER_LENGTH = 3


@lru_cache(maxsize=1)
def default_tokenizer():
    from kvpolicies.integrations.models import converted_gguf, embedded_gguf
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(converted_gguf(embedded_gguf())), local_files_only=True)


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _fit(tokenizer, target: int, make, low: int, high: int) -> str:
    """Largest ``make(n)`` (n in [low, high]) whose length is at most ``target`` tokens: a binary search."""
    best = make(low)
    while low <= high:
        middle = (low + high) // 2
        text = make(middle)
        if count_tokens(tokenizer, text) <= target:
            best, low = text, middle + 1
        else:
            high = middle - 1
    return best


def _needle(rng: random.Random) -> tuple[str, str]:
    passkey = f"{rng.randint(10000, 99999)}"
    return passkey, f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "


def _passkey_text(needle: str, repeats: int, depth: float) -> str:
    before = round(repeats * depth)
    return PASSKEY_INTRO + FILLER * before + needle + FILLER * (repeats - before) + PASSKEY_QUESTION


def passkey_prompt(rng: random.Random, approx_tokens: int, depth: float | None = None) -> tuple[str, str, str]:
    """``(prompt, needle, passkey)`` with ~13 tokens per filler sentence, without a tokenizer (probes, benchmarks)."""
    passkey, needle = _needle(rng)
    repeats = max(2, approx_tokens // 20)
    if depth is None:
        depth = rng.randint(1, repeats - 1) / repeats
    return _passkey_text(needle, repeats, depth), needle, passkey


def _grid(task: str, lengths: Sequence[int], depths: Sequence[float], per_cell: int, seed: int):
    """``(length, depth, rng)`` for every sample of a length × depth grid; each rng depends on its cell only."""
    for length in lengths:
        for depth in depths:
            for index in range(per_cell):
                yield length, depth, random.Random(_seed(seed, task, length, depth, index))


def passkey_samples(
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    per_cell: int = DEFAULT_PER_CELL,
    seed: int = 0,
    tokenizer=None,
) -> list[dict]:
    """Passkey retrieval: a 5-digit key in repeated filler, ``lengths`` (tokens) × ``depths`` × ``per_cell``."""
    tokenizer = tokenizer or default_tokenizer()
    samples = []
    for length, depth, rng in _grid("passkey", lengths, depths, per_cell, seed):
        passkey, needle = _needle(rng)
        room = length - count_tokens(tokenizer, PASSKEY_INTRO + needle + PASSKEY_QUESTION)
        prompt = _fit(tokenizer, length, lambda repeats: _passkey_text(needle, repeats, depth), 1, max(2, room // 10))
        samples.append({"prompt": prompt, "answer": passkey, "length": length, "depth": depth,
                        "tokens": count_tokens(tokenizer, prompt)})
    return samples


def haystack_text() -> str:
    """Natural English prose from the Python documentation bundled with CPython, in a fixed order. Its last third is
    the policies' calibration text (:mod:`kvpolicies.corpus`), which no haystack of up to 8k tokens reaches: a
    slice starts in the first half and spans at most 8 characters a token."""
    from kvpolicies.corpus import python_documentation

    return python_documentation()


def niah_samples(
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    per_cell: int = DEFAULT_PER_CELL,
    seed: int = 0,
    tokenizer=None,
) -> list[dict]:
    """Needle in a haystack: a city's 7-digit magic number hidden in documentation prose at a given depth."""
    tokenizer = tokenizer or default_tokenizer()
    haystack = haystack_text()
    samples = []
    for length, depth, rng in _grid("niah", lengths, depths, per_cell, seed):
        city = rng.choice(CITIES)
        number = f"{rng.randint(1_000_000, 9_999_999)}"
        needle = f"\nThe special magic number for {city} is: {number}.\n"
        question = (f"\n\nWhat is the special magic number for {city} mentioned in the text above? "
                    f"The special magic number for {city} is:")
        prompt = _hide_in_prose(tokenizer, haystack, rng, length, depth, NIAH_INTRO, needle, question)
        samples.append({"prompt": prompt, "answer": number, "city": city, "length": length, "depth": depth,
                        "tokens": count_tokens(tokenizer, prompt)})
    return samples


def text_passkey_samples(
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    per_cell: int = DEFAULT_PER_CELL,
    seed: int = 0,
    tokenizer=None,
) -> list[dict]:
    """Passkey retrieval in natural text: ``kvp_passkey``'s needle (a 5-digit key stated twice) and question, hidden
    in documentation prose instead of repeated filler.

    This is the task of the kvpress reference measurements in the team notes, so policies can be checked against
    them; it sits between the two others: the key is as easy to find as in ``kvp_passkey`` but the haystack is as
    varied as in ``kvp_niah``, so a policy cannot win by dropping near-duplicate filler.

    The needle is a paragraph of its own. Spliced into a sentence of Python documentation, "the pass key" reads as
    Python's ``pass`` statement: the embedded model with its full cache then answered "a special syntax in Python"
    and the like, retrieving 11 of 24 keys (0.46, against 0.958 on the kvpress anchors' task); between paragraphs
    it retrieved 10 of the first 12 in a probe.
    """
    tokenizer = tokenizer or default_tokenizer()
    haystack = haystack_text()
    samples = []
    for length, depth, rng in _grid("passkey_text", lengths, depths, per_cell, seed):
        passkey, needle = _needle(rng)
        prompt = _hide_in_prose(tokenizer, haystack, rng, length, depth, PASSKEY_INTRO, needle.strip() + "\n\n",
                                PASSKEY_QUESTION, between="\n\n")
        samples.append({"prompt": prompt, "answer": passkey, "length": length, "depth": depth,
                        "tokens": count_tokens(tokenizer, prompt)})
    return samples


def _hide_in_prose(tokenizer, haystack: str, rng: random.Random, length: int, depth: float, intro: str,
                   needle: str, question: str, between: str = ". ") -> str:
    """``intro`` + a slice of ``haystack`` with ``needle`` after the last ``between`` (end of a sentence or of a
    paragraph) before ``depth`` + ``question``: the longest such prompt of at most ``length`` tokens, the slice
    starting at a random point of the first half."""
    start = rng.randint(0, len(haystack) // 2)

    def make(chars: int) -> str:
        body = haystack[start : start + chars]
        cut = round(len(body) * depth)
        boundary = body.rfind(between, 0, cut)
        cut = boundary + len(between) if boundary > 0 else cut
        return intro + body[:cut] + needle + body[cut:] + question

    return _fit(tokenizer, length, make, 100, length * 8)


def ppl_documents(lengths: Sequence[int] = PPL_LENGTHS, per_length: int = PPL_PER_LENGTH, seed: int = 0,
                  tokenizer=None) -> list[dict]:
    """Long documents of natural text (Python documentation) of about ``lengths`` tokens for rolling perplexity."""
    tokenizer = tokenizer or default_tokenizer()
    haystack = haystack_text()
    documents = []
    for length in lengths:
        for index in range(per_length):
            rng = random.Random(_seed(seed, "ppl", length, 0, index))
            start = rng.randint(0, len(haystack) // 2)
            start = haystack.find("\n\n", start) + 2
            text = _fit(tokenizer, length, lambda chars: haystack[start : start + chars], 100, length * 8)
            documents.append({"text": text, "length": length, "tokens": count_tokens(tokenizer, text)})
    return documents


GENERATORS = {
    "kvp_passkey": passkey_samples,
    "kvp_passkey_text": text_passkey_samples,
    "kvp_niah": niah_samples,
    "kvp_ppl": ppl_documents,
}
DATA_VERSION = 2
"""Bump when a generator's output changes, so files cached under the old parameters are not reused."""


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    """Write ``rows`` through a staging file of this call's own, then one rename: a half-written file is never read
    as data, and two processes building the same task's data at once (two sweeps) never write into one file."""
    from kvpolicies.files import staged

    path.parent.mkdir(parents=True, exist_ok=True)
    with staged(path, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")
    return path


def dataset_file(task: str, **parameters) -> Path:
    """The JSONL file of ``task`` for ``parameters``, generated under the user cache on first use."""
    from kvpolicies.integrations.models import cache_dir

    text = json.dumps({"data_version": DATA_VERSION, **parameters}, sort_keys=True, default=list)
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = cache_dir() / "evals" / f"{task}-{key}.jsonl"
    if not path.exists():
        write_jsonl(path, GENERATORS[task](**parameters))
    return path


def _seed(seed: int, *parts) -> int:
    return int.from_bytes(hashlib.sha256(repr((seed, *parts)).encode()).digest()[:8], "big")
