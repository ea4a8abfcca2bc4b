"""How a model is loaded: the options a GPU user sets, one set for ``generate``, ``bench``, ``sweep`` and grid files.

Which of them change results decides where they go: ``dtype`` and ``revision`` change what the model computes, so a
sweep's cell key holds them (when given); ``device``, ``device_map`` and ``attn_implementation`` change where and
how fast it runs, so each result records them, as resolved where it ran, next to its device.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DTYPE_NAMES = ("float32", "bfloat16", "float16")
ATTENTION_KERNELS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


class Loading(BaseModel):
    """Model-loading options; None everywhere is what ``load_model()`` picks by itself (CUDA and bfloat16 where
    there is a GPU, the CPU and float32 elsewhere, SDPA, the hub's main revision)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str | None = Field(None, description="cpu, cuda, cuda:1, ... (default: cuda if available)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="default: bfloat16 on CUDA, float32 elsewhere")
    device_map: Literal["auto"] | None = Field(
        None, description="auto: accelerate spreads a model too large for one GPU over every visible GPU (and the "
                          "CPU past them); leave device unset then")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"] | None = (
        Field(None, description="the model's attention for layers not yet compressed (default: sdpa)"))
    revision: str | None = Field(None, description="a hub branch, tag or commit (default: main)")

    @model_validator(mode="after")
    def _one_placement(self) -> Loading:
        if self.device_map is not None and self.device is not None:
            raise ValueError(f"device_map={self.device_map} places the model itself, over every visible GPU; give it "
                             f"or device={self.device}, not both")
        return self

    def identity(self) -> dict[str, Any]:
        """What a cell's key holds: the options that change results, where given (none: the keys of before)."""
        return {name: value for name in ("dtype", "revision") if (value := getattr(self, name)) is not None}

    def given(self) -> dict[str, Any]:
        """The options set, by name."""
        return self.model_dump(exclude_none=True)


def add_loading_arguments(parser, device_and_dtype: bool = True) -> None:
    """The command-line flags of :class:`Loading` (``--device`` and ``--dtype`` left out where a command has its
    own)."""
    if device_and_dtype:
        parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
        parser.add_argument("--dtype", choices=DTYPE_NAMES, help="default: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--device-map", choices=("auto",),
                        help="auto: spread a model too large for one GPU over every visible GPU (accelerate)")
    parser.add_argument("--attn-implementation", choices=ATTENTION_KERNELS,
                        help="attention of the layers not yet compressed (default: sdpa)")
    parser.add_argument("--revision", help="hub branch, tag or commit of --model (default: main)")


EXTRAS = ("device_map", "attn_implementation", "revision")
"""The options beyond device and dtype, for a command that reads those two its own way (``bench``)."""


def loading_of(args, names: tuple[str, ...] | None = None) -> Loading:
    """The :class:`Loading` a command's flags name (only ``names`` of them, where given)."""
    return Loading(**{name: value for name in names or tuple(Loading.model_fields)
                      if (value := getattr(args, name, None)) is not None})
