"""Write a blend pattern that no paper or issue uses, for trying a defence on a trigger it was
never tuned to: concentric rings, red on the even rings and blue on the odd, centred off the
image's middle.

    python benchmarks/novel_pattern.py /tmp/rings.png
    unpoison run --attack blended --trigger image --attack-param pattern=/tmp/rings.png --alpha 0.15 ...
"""

from __future__ import annotations

import sys

import numpy as np
from PIL import Image


def rings(size: int = 32, centre: tuple[float, float] = (11.5, 19.5), width: float = 2.5) -> np.ndarray:
    rows, cols = np.mgrid[0:size, 0:size]
    ring = (np.hypot(rows - centre[0], cols - centre[1]) // width).astype(int)
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[ring % 2 == 0] = (220, 40, 40)
    image[ring % 2 == 1] = (40, 60, 220)
    return image


if __name__ == "__main__":
    Image.fromarray(rings()).save(sys.argv[1])
