"""The model catalogue: what each model accepts and what it costs, as data.

A model is one TOML file in ``protocol/catalogue/`` (or any directory handed to
:func:`load_catalogue`), decoded and checked by msgspec. Nothing here knows a model by name, so a
model is added without code.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import msgspec

__all__ = [
    "Catalogue",
    "ModelSpec",
    "Size",
    "default_catalogue",
    "load_catalogue",
]

Tier = Literal["1K", "2K", "4K"]


class Size(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tier: Tier
    ratio: str
    width: Annotated[int, msgspec.Meta(gt=0)]
    height: Annotated[int, msgspec.Meta(gt=0)]

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"


class ModelSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    air: str
    slug: str
    task_type: Literal["imageInference"]
    default_size: str
    max_reference_images: Annotated[int, msgspec.Meta(ge=0)]
    output_types: list[str]
    output_formats: list[str]
    safety_modes: list[str]
    supported_parameters: frozenset[str]
    cost: dict[Tier, float]
    sizes: list[Size]

    def __post_init__(self) -> None:
        tiers = {size.tier for size in self.sizes}
        if missing := tiers - self.cost.keys():
            raise ValueError(f"{self.air}: no cost for tier(s) {sorted(missing)}")
        if self.size_of(*_parse_size(self.default_size)) is None:
            raise ValueError(f"{self.air}: default_size {self.default_size} is not in sizes")

    def size_of(self, width: int, height: int) -> Size | None:
        for size in self.sizes:
            if size.width == width and size.height == height:
                return size
        return None

    @property
    def size_labels(self) -> list[str]:
        return [size.label for size in self.sizes]

    def documentation(self, parameter: str) -> str:
        anchor = parameter.replace(".", "-").lower()
        return f"https://runware.ai/docs/models/{self.slug}#request-{anchor}"

    def price(self, width: int, height: int, number_results: int) -> float:
        """USD for a validated task: one tier price per result.

        Summed in Decimal so that 3 x 0.195 is 0.585, not 0.5850000000000001.
        """
        size = self.size_of(width, height)
        if size is None:
            raise ValueError(f"{width}x{height} is not a size of {self.air}")
        return float(Decimal(str(self.cost[size.tier])) * number_results)


def _parse_size(label: str) -> tuple[int, int]:
    width, _, height = label.partition("x")
    return int(width), int(height)


class Catalogue:
    """The models the gateway accepts, by AIR id."""

    def __init__(self, models: Iterable[ModelSpec]) -> None:
        self._models = {model.air: model for model in models}

    def get(self, air: str) -> ModelSpec | None:
        return self._models.get(air)

    @property
    def airs(self) -> list[str]:
        return sorted(self._models)

    def __len__(self) -> int:
        return len(self._models)


def load_catalogue(*directories: Path) -> Catalogue:
    """Every ``*.toml`` in the given directories; the packaged catalogue when none is given."""
    sources: list[bytes] = []
    if directories:
        for directory in directories:
            sources.extend(path.read_bytes() for path in sorted(directory.glob("*.toml")))
    else:
        packaged = resources.files("protocol") / "catalogue"
        for entry in sorted(packaged.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".toml"):
                sources.append(entry.read_bytes())
    return Catalogue(msgspec.toml.decode(source, type=ModelSpec) for source in sources)


_DEFAULT: Catalogue | None = None


def default_catalogue() -> Catalogue:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_catalogue()
    return _DEFAULT
