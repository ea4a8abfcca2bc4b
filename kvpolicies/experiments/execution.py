"""How a grid's cells are run: in this process, or on a Ray cluster with given resources per cell.

None of it is part of a cell's key: where a cell ran does not change what it computes, so a cell computed by a Ray
worker and one computed locally are the same file, and a cluster run and a local run fill one results folder
interchangeably.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, field_validator, model_validator


class Execution(BaseModel):
    """The ``execution`` section of a sweep file, and the command line's ``--executor``, ``--address``,
    ``--cpus-per-cell``, ``--gpus-per-cell`` and ``--max-retries``."""

    model_config = ConfigDict(extra="forbid")

    executor: Literal["local", "ray"] = "local"
    """``local``: one cell after another in this process (needs no Ray). ``ray``: each cell on a Ray worker."""
    address: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] | None = None
    """The Ray cluster to join: ``auto`` (the one ``ray start`` made on this node) or ``HOST:PORT``; none starts a
    Ray instance on this machine for the sweep's duration."""
    cpus_per_cell: float | None = Field(None, gt=0)
    """CPUs a worker reserves (default 1), and the threads torch uses in it."""
    gpus_per_cell: float | None = Field(None, ge=0)
    """GPUs a worker reserves (default 0); fractions share a GPU between workers."""
    max_retries: StrictInt | None = Field(None, ge=0)
    """How often a cell whose worker died (killed, out of memory, node lost) is run again before it is recorded as
    failed (default 2). A cell that raises is not retried: it is recorded with its error, as locally."""

    @field_validator("cpus_per_cell", "gpus_per_cell", mode="before")
    @classmethod
    def _a_number(cls, value: object) -> object:
        """``true`` in a grid file is a mistake, not 1 CPU (a float field would read it so)."""
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value

    @field_validator("cpus_per_cell", "gpus_per_cell")
    @classmethod
    def _ray_can_reserve(cls, value: float | None) -> float | None:
        """Ray reserves resources in steps of 1/10000 and rejects a finer request with a traceback."""
        if value is not None and abs(value * 10_000 - round(value * 10_000)) > 1e-6:
            raise ValueError(f"Ray reserves resources in steps of 0.0001; got {value}")
        return value

    @model_validator(mode="after")
    def _ray_options_need_ray(self) -> Execution:
        if self.gpus_per_cell is not None and self.gpus_per_cell > 1 and not float(self.gpus_per_cell).is_integer():
            raise ValueError(f"--gpus-per-cell above 1 must be a whole number of GPUs (Ray shares a GPU only below "
                             f"one); got {self.gpus_per_cell}")
        if self.executor == "local":
            given = [name for name in ("address", "cpus_per_cell", "gpus_per_cell", "max_retries")
                     if getattr(self, name) is not None]
            if given:
                flags = ", ".join("--" + name.replace("_", "-") for name in given)
                verb = "apply" if len(given) > 1 else "applies"
                raise ValueError(f"{flags} {verb} only to the Ray executor; add --executor ray (executor: ray in a "
                                 "sweep file) or leave them out")
        return self

    @property
    def cpus(self) -> float:
        return 1.0 if self.cpus_per_cell is None else self.cpus_per_cell

    @property
    def gpus(self) -> float:
        return 0.0 if self.gpus_per_cell is None else self.gpus_per_cell

    @property
    def retries(self) -> int:
        return 2 if self.max_retries is None else self.max_retries
