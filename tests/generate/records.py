"""Rewrite a generation's records as an older fulora wrote them (for tests of older runs)."""

import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def rewrite_png_records(out: Path, change: Callable[[dict], dict]) -> None:
    """Each PNG's ``fulora`` record under ``out`` replaced by ``change(record)``, its A1111
    text kept."""
    for png in out.glob("*/*.png"):
        with Image.open(png) as img:
            img.load()
            record = json.loads(img.text["fulora"])
            parameters = img.text["parameters"]
        info = PngInfo()
        info.add_text("parameters", parameters)
        info.add_text("fulora", json.dumps(change(record)))
        img.save(png, pnginfo=info)


def refused_then_finished(out: Path, new, old, message: str) -> tuple[dict, Path]:
    """An older run in ``out``: refused by the ``new`` config finished and unfinished (its last
    image removed), which would mix two makings; then finished by the ``old`` config, remaking
    that image with the same pixels. Returns the finishing run's record and the image."""
    import numpy as np
    import pytest

    from fulora.errors import ConfigError
    from fulora.generate.run import generate

    last = sorted(out.glob("brain/*.png"))[-1]
    before = np.asarray(Image.open(last))
    for finished in (True, False):
        if not finished:
            (out / "done.json").unlink()
            last.unlink()
        with pytest.raises(ConfigError, match=message):
            generate(out, new, progress=False)
    record = generate(out, old, progress=False)
    assert record["this_run_generated"] == 1
    assert np.array_equal(np.asarray(Image.open(last)), before)
    return record, last
