"""Models that ship inside the fulora package, by name (usable wherever a base model is asked)."""

from __future__ import annotations

from pathlib import Path

#: ``fulora:phantom-sd``: the pretrained tiny foundation model (see ``fulora.foundation``).
SHIPPED_MODELS: dict[str, Path] = {
    "fulora:phantom-sd": Path(__file__).resolve().parent / "foundation" / "phantom-sd",
}
PHANTOM_SD = "fulora:phantom-sd"


def shipped_model(name: str) -> Path | None:
    """The folder of a shipped model given its ``fulora:`` name, or None for any other text."""
    return SHIPPED_MODELS.get(name.strip())
