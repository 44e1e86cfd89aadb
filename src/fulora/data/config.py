"""The configuration of ``fulora data phantom``.

Kept apart from the renderer, which imports SciPy and matplotlib (1.2 s on 2 cores), so that
``fulora data inspect`` and the other data commands start fast, and a bad value is refused
before those load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fulora.config import AT_LEAST_1, SEED, Checked, Range
from fulora.errors import ConfigError
from fulora.planes import PAPER_PLANES

#: Planes the phantom can draw.
PHANTOM_PLANES: tuple[str, ...] = PAPER_PLANES


@dataclass
class PhantomConfig(Checked):
    """Configuration of ``fulora data phantom``."""

    RANGES = {"per_class": AT_LEAST_1, "seed": SEED, "size": Range(32, 4096)}

    per_class: int = 20  # images per plane and domain
    domain: Literal["source", "target", "both"] = "source"  # which simulated machine
    seed: int = 0  # dataset seed
    planes: list[str] = field(default_factory=lambda: list(PHANTOM_PLANES))  # planes to draw
    size: tuple[int, int] | None = None  # (height, width); default: the domain's screen size
    grid: bool = True  # write grid.png with a few images per plane

    def check(self) -> None:
        """Only planes the phantom draws (cervix is a plane label, but not drawn)."""
        unknown = [p for p in self.check_planes_of("planes") if p not in PHANTOM_PLANES]
        if unknown:
            raise ConfigError(
                f"'planes': the phantom draws {', '.join(PHANTOM_PLANES)}; not {', '.join(unknown)}"
            )
