"""What each task's metadata may hold (its data parameters), checked before any sample is built.

A task's metadata comes from a sweep grid (``tasks: [{name, metadata}]``) or from ``lm-eval --metadata``. Unchecked,
a mistake ran far before it showed: a negative length wrote a prompt labelled with it, a length past the model's
context built samples for minutes (or hung), a string where a list belongs ended in a traceback. Each task family
has a schema here; the sweep checks a grid's metadata with it before anything is loaded, and each task's loader
checks what lm-eval hands it, so both paths end in ``kvpolicies: error: ...``.

The minimum lengths were measured with the embedded model's tokenizer: below 120 tokens a passkey or needle prompt
cannot hold its instructions, needle and question (the generators return a longer prompt than asked); a perplexity
document below 64 tokens overshoots its length. lm-eval's RULER generators fail below 512 tokens for most tasks
(``niah_multikey_1``, ``niah_multiquery``, ``niah_multivalue``, ``niah_multikey_3``: no room for the needles and
128 answer tokens at 256), and ``vt`` loops forever below about 850 (its in-context example alone is sized to 500
tokens), so ``vt`` and the ``kvp_ruler`` group need 1024.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from kvpolicies.errors import UsageError, describe
from kvpolicies_evals import data
from kvpolicies_evals.tasks import generated_tokens


class TaskMetadata(BaseModel):
    """Base of the schemas: strict types (``true`` is not 1, ``"2048"`` is not a list), no unknown key. Only keys
    given are checked; a key left out takes its generator's default (the None defaults here are never read)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    LENGTHS: ClassVar[str] = "lengths"
    """The field that holds token lengths, checked against the model's positions."""
    LENGTHS_INCLUDE_GENERATION: ClassVar[bool] = False
    """True when a length is the whole sample, generated tokens included (RULER's ``max_seq_lengths``)."""
    DEFAULT_LENGTHS: ClassVar[tuple[int, ...]] = ()
    """The lengths the task's generator makes when the metadata gives none, shortest first; () when unknown."""

    @classmethod
    def samples_per_length(cls, metadata: dict[str, Any]) -> int | None:
        """How many samples the generator writes for each length before the next (so that a ``limit`` tells which
        lengths run); None when unknown."""
        return None

    @classmethod
    def accepts(cls) -> str:
        """The keys and what each takes, for an error message."""
        return "; ".join(f"{name} ({field.description})" for name, field in cls.model_fields.items())


class Retrieval(TaskMetadata):
    """``kvp_passkey``, ``kvp_passkey_text``, ``kvp_niah``: a needle at each depth of each length."""

    lengths: list[Annotated[StrictInt, Field(ge=120)]] = Field(
        None, min_length=1,
        description="a list of prompt lengths in tokens, each >= 120, the generated answer not included")
    depths: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        None, min_length=1, description="a list of needle positions, each in [0, 1], 0 the start")
    per_cell: StrictInt = Field(None, ge=1, description="samples per length and depth, a whole number >= 1")
    seed: StrictInt = Field(None, description="a whole number")

    DEFAULT_LENGTHS: ClassVar[tuple[int, ...]] = data.DEFAULT_LENGTHS

    @classmethod
    def samples_per_length(cls, metadata: dict[str, Any]) -> int | None:
        return len(metadata.get("depths") or data.DEFAULT_DEPTHS) * metadata.get("per_cell", data.DEFAULT_PER_CELL)


class Perplexity(TaskMetadata):
    """``kvp_ppl``: documents of each length."""

    lengths: list[Annotated[StrictInt, Field(ge=64)]] = Field(
        None, min_length=1, description="a list of document lengths in tokens, each >= 64")
    per_length: StrictInt = Field(None, ge=1, description="documents per length, a whole number >= 1")
    seed: StrictInt = Field(None, description="a whole number")

    DEFAULT_LENGTHS: ClassVar[tuple[int, ...]] = data.PPL_LENGTHS

    @classmethod
    def samples_per_length(cls, metadata: dict[str, Any]) -> int | None:
        return metadata.get("per_length", data.PPL_PER_LENGTH)


class Ruler(TaskMetadata):
    """lm-eval's RULER generators (``kvp_ruler_*``): what ``lm_eval.tasks.ruler`` reads from its metadata."""

    LENGTHS: ClassVar[str] = "max_seq_lengths"
    LENGTHS_INCLUDE_GENERATION: ClassVar[bool] = True

    max_seq_lengths: list[Annotated[StrictInt, Field(ge=512)]] = Field(
        None, min_length=1,
        description="a list of sample lengths in tokens, prompt and answer together, each >= 512")
    tokenizer: Any = Field(None, description="the tokenizer that sizes the samples, default the model's")


class RulerVariableTracking(Ruler):
    """``kvp_ruler_vt`` and the ``kvp_ruler`` group, which runs it: 1024 tokens at least."""

    max_seq_lengths: list[Annotated[StrictInt, Field(ge=1024)]] = Field(
        None, min_length=1,
        description="a list of sample lengths in tokens, prompt and answer together, each >= 1024, vt's minimum")


FAMILIES: dict[str, type[TaskMetadata]] = {
    "kvp_passkey": Retrieval, "kvp_passkey_text": Retrieval, "kvp_niah": Retrieval, "kvp_ppl": Perplexity,
    "kvp_ruler": RulerVariableTracking, "kvp_ruler_vt": RulerVariableTracking,
}


def schema(task: str) -> type[TaskMetadata] | None:
    """The schema of ``task``'s metadata; None for a task that is not ours (lm-eval's tasks read their own)."""
    return FAMILIES.get(task) or (Ruler if task.startswith("kvp_ruler_") else None)


def validate(task: str, metadata: dict[str, Any]) -> None:
    """Check ``metadata`` of ``task``: every key known, every value of its type and range (a UsageError saying
    what ``task`` accepts otherwise)."""
    model = schema(task)
    if model is None:
        return
    try:
        model.model_validate(metadata)
    except ValidationError as error:
        raise UsageError(f"task {task}: invalid metadata: {describe(error, with_input=True)}; {task} accepts "
                         f"{model.accepts()}") from None


def check_fits(task: str, metadata: dict[str, Any], model: str | None, limit: int | None = None,
               defaults: bool = True) -> None:
    """Check that the (validated) lengths ``metadata`` gives fit ``model``: each length, plus the tokens the task
    generates when the length does not count them, within the positions the model was trained for.

    Without lengths in ``metadata``, the task's default lengths are checked (with ``defaults``), as far as the first
    ``limit`` samples reach: the defaults run shortest first, so a small ``limit`` keeps a long default out (the
    embedded model's 8192 positions hold every default length but passkey's 8192 and its answer). Skipped when the
    model's positions cannot be read offline (:func:`model_positions`).
    """
    kind = schema(task)
    if kind is None:
        return
    given = kind.LENGTHS in metadata
    lengths = list(metadata[kind.LENGTHS]) if given else list(kind.DEFAULT_LENGTHS) if defaults else []
    if not given and limit is not None and (per_length := kind.samples_per_length(metadata)):
        lengths = lengths[:-(-limit // per_length)]
    positions = model_positions(model) if lengths else None
    if positions is None:
        return
    generated = 0 if kind.LENGTHS_INCLUDE_GENERATION else generated_tokens(task)
    too_long = [length for length in lengths if length + generated > positions]
    if too_long:
        from kvpolicies.integrations.models import EMBEDDED_MODEL

        needs = f" plus the {generated} tokens it generates" if generated else ""
        which = (f"{kind.LENGTHS} {', '.join(map(str, too_long))} do" if given else
                 f"its default {kind.LENGTHS} ({', '.join(map(str, kind.DEFAULT_LENGTHS))}) include "
                 f"{', '.join(map(str, too_long))}, which {'does' if len(too_long) == 1 else 'do'}")
        fix = "" if given else (f"; or a limit of at most {kind.samples_per_length(metadata) * (len(lengths) - len(too_long))}"
                                " samples, which the shorter lengths fill")
        raise UsageError(f"task {task}: {which} not fit model {model or EMBEDDED_MODEL}, trained for {positions} "
                         f"positions (each sample takes its length{needs}); use {kind.LENGTHS} of at most "
                         f"{positions - generated}{fix}, or a model with a longer context")


def loader_parameters(task: str, options: dict[str, Any]) -> dict[str, Any]:
    """The parameters of ``task`` among ``options``, checked: what a task's loader calls before building samples.

    lm-eval hands a loader its task's metadata, ``--metadata`` and the model args merged into one dict, so only the
    task's own keys are read (others are not a mistake here) and checked with :func:`validate`; the lengths are
    checked against the model named by ``pretrained`` (a sweep and ``kvpolicies lm-eval`` always name one; None is
    the embedded model).
    """
    model = schema(task)
    own = {key: options[key] for key in model.model_fields if key in options} if model else {}
    validate(task, own)
    if "pretrained" in options and isinstance(options["pretrained"], str | None):  # not a model object
        check_fits(task, own, options["pretrained"], defaults=False)  # lm-eval's --limit is not among the options
    return own


_positions: dict[str | None, int] = {}
"""Positions read so far. Only those found are kept: a hub model's config may reach the local cache later in the same
process (its first load fetches it), and then it is read."""


def model_positions(model: str | None) -> int | None:
    """The positions ``model`` was trained for (its config's ``max_position_embeddings``), read without loading
    weights; None when its config cannot be read offline (a hub id not in the local cache) or is not a plain config
    (a ``.gguf`` file other than the embedded model's, converted only when the model loads).

    The embedded model's config is that of its converted folder (converted once per machine, as any use of it
    does). A model path that does not exist is a :class:`~kvpolicies.errors.ModelLoadError`.
    """
    from kvpolicies.integrations.models import EMBEDDED_MODEL, resolve_source

    if model in _positions:
        return _positions[model]
    if model is not None and model != EMBEDDED_MODEL and model.endswith(".gguf"):
        return None
    source, _ = resolve_source(model)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None
    positions = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    _positions[model] = positions
    return positions
