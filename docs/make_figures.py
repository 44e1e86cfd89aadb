"""Regenerate the figures the README shows: ``python docs/make_figures.py``."""

from pathlib import Path

from fulora.data.phantom import phantom_grid

DOCS = Path(__file__).resolve().parent

if __name__ == "__main__":
    print(phantom_grid(DOCS / "phantom_grid.png", seed=0, per_row=4))
