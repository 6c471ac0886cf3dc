"""Checks of saved figures (PNG files) that need no reference image."""

from __future__ import annotations

from pathlib import Path


def drawn_colours(path: Path) -> int:
    """How many colours (other than white and greys) cover at least 0.1% of a PNG: bars and lines drawn in
    colour. A figure that saved only its frame has none."""
    import matplotlib.image
    import numpy as np

    rgb = (matplotlib.image.imread(str(path))[..., :3] * 255).round().astype(np.int64).reshape(-1, 3)
    coloured = rgb[rgb.max(axis=1) - rgb.min(axis=1) > 24]  # grey and white have equal channels
    values, counts = np.unique(
        coloured[:, 0] * 65536 + coloured[:, 1] * 256 + coloured[:, 2], return_counts=True
    )
    return int((counts >= 0.001 * len(rgb)).sum())
