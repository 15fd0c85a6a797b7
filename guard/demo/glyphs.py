"""The demo worlds' images, built from what scikit-learn ships (nothing is downloaded).

scikit-learn's digits, and *glyphs*, a 10-class colour task of sign-like shapes composited on crops of
scikit-learn's sample photos, where changing a class takes many pixels (so a 3x3 trigger is the cheapest
way to a label).
"""

from __future__ import annotations

import numpy as np


def digits(*, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (1797 images), upsampled to ``size`` x ``size``, 1 channel, in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    k = size // 8
    if k > 1:
        x = x.repeat(k, axis=2).repeat(k, axis=3)
    return np.clip(x, 0, 1), d.target.astype(np.int64)


_PHOTOS: np.ndarray | None = None


def _photos() -> np.ndarray:
    """scikit-learn's two sample photos at a few scales, as float32 HWC arrays (cached)."""
    global _PHOTOS
    if _PHOTOS is None:
        from PIL import Image
        from sklearn.datasets import load_sample_images

        scaled = []
        for img in load_sample_images().images:
            for w in (96, 160):
                h = int(img.shape[0] * w / img.shape[1])
                im = Image.fromarray(img).resize((w, h), Image.BILINEAR)
                scaled.append(np.asarray(im, dtype=np.float32) / 255.0)
        _PHOTOS = scaled  # type: ignore[assignment]
    return _PHOTOS  # type: ignore[return-value]


GLYPH_NAMES = ["disk", "ring", "square", "triangle", "plus", "cross", "dome", "diamond", "wedge", "tee"]

_PALETTE = np.array([
    [0.90, 0.10, 0.10], [0.10, 0.70, 0.15], [0.15, 0.30, 0.95], [0.95, 0.85, 0.10], [0.95, 0.45, 0.05],
    [0.65, 0.10, 0.85], [0.05, 0.80, 0.85], [1.00, 1.00, 1.00], [0.95, 0.35, 0.70], [0.55, 0.85, 0.25],
], dtype=np.float32)


def _glyph_sdf(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (in units of glyph radius, < 0 inside) of glyph ``kind`` at coordinates u, v."""
    r = np.sqrt(u * u + v * v)
    if kind == 0:
        return r - 1.0
    if kind == 1:
        return np.abs(r - 0.75) - 0.25
    if kind == 2:
        return np.maximum(np.abs(u), np.abs(v)) - 0.85
    if kind == 3:
        return np.maximum(v - 0.7, np.maximum(1.7 * np.abs(u) - 0.7 - v * 1.0, -1.0 - v * 0.0) * 0.7)
    if kind == 4:
        return np.minimum(np.maximum(np.abs(u) - 0.3, np.abs(v) - 1.0), np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.3))
    if kind == 5:
        a, b = (u + v) / np.sqrt(2), (u - v) / np.sqrt(2)
        return np.minimum(np.maximum(np.abs(a) - 0.3, np.abs(b) - 1.05), np.maximum(np.abs(a) - 1.05, np.abs(b) - 0.3))
    if kind == 6:
        vv = v - 0.45
        return np.maximum(np.sqrt(u * u + vv * vv) - 1.15, vv)
    if kind == 7:
        return np.abs(u) + np.abs(v) - 1.05
    if kind == 8:
        return np.maximum(-v - 0.7, np.maximum(1.7 * np.abs(u) - 0.7 + v, -1.0) * 0.7)
    if kind == 9:
        top = np.maximum(np.abs(u) - 1.0, np.abs(v + 0.7) - 0.3)
        stem = np.maximum(np.abs(u) - 0.3, np.abs(v - 0.15) - 0.85)
        return np.minimum(top, stem)
    raise ValueError(kind)


def _backgrounds(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``n`` random crops of the sample photos (random scale, flip, brightness), HWC float32."""
    photos = _photos()
    x = np.empty((n, size, size, 3), dtype=np.float32)
    for i in range(n):
        p = photos[rng.integers(len(photos))]
        if p.shape[0] < size or p.shape[1] < size:  # large inputs: upscale the photo first
            reps = int(np.ceil(size / min(p.shape[:2])))
            p = p.repeat(reps, 0).repeat(reps, 1)
        r0 = rng.integers(0, p.shape[0] - size + 1)
        c0 = rng.integers(0, p.shape[1] - size + 1)
        crop = p[r0:r0 + size, c0:c0 + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        x[i] = np.clip(crop * rng.uniform(0.6, 1.2), 0, 1)
    return x


def _draw(rng: np.random.Generator, x: np.ndarray, kinds: np.ndarray, centre: tuple[float, float],
          radius: float, jitter: float) -> None:
    """Draw glyph ``kinds[i]`` on image ``x[i]`` (in place) around ``centre`` (row, col) with a dark outline."""
    size = x.shape[1]
    grid = (np.arange(size, dtype=np.float32) + 0.5)
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    for c in range(10):
        idx = np.flatnonzero(kinds == c)
        if idx.size == 0:
            continue
        m = idx.size
        cx = centre[1] + rng.uniform(-jitter, jitter, m).astype(np.float32)
        cy = centre[0] + rng.uniform(-jitter, jitter, m).astype(np.float32)
        rad = rng.uniform(0.26, 0.36, m).astype(np.float32) * radius
        th = rng.uniform(-0.25, 0.25, m).astype(np.float32)
        dx = (gx[None] - cx[:, None, None]) / rad[:, None, None]
        dy = (gy[None] - cy[:, None, None]) / rad[:, None, None]
        cos, sin = np.cos(th)[:, None, None], np.sin(th)[:, None, None]
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        sdf = _glyph_sdf(c, u, v) * rad[:, None, None]  # back to pixels
        fill = np.clip(0.5 - sdf, 0, 1)[..., None]
        outline = np.clip(2.0 - np.abs(sdf + 0.5), 0, 1)[..., None] * (1 - fill)
        colour = _PALETTE[rng.integers(0, len(_PALETTE), m)] * rng.uniform(0.75, 1.0, (m, 1)).astype(np.float32)
        img = x[idx]
        img = img * (1 - outline) + 0.05 * outline
        img = img * (1 - fill) + colour[:, None, None, :] * fill
        x[idx] = img


def glyphs(n: int, *, seed: int = 0, size: int = 32, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``n`` seeded 3 x ``size`` x ``size`` images of glyph classes on crops of the sample photos.

    Each image: a random photo crop (random scale, flip, brightness), then a glyph whose shape is the
    class, with random colour, position jitter, radius and rotation, drawn with a dark outline like a
    road sign. ``classes`` 100 or 1000 composes classes: two or three glyphs side by side, the class
    the decimal number their shapes spell (left to right), so a class change still takes a whole
    glyph's worth of pixels. Returns ``x`` float32 ``(n, 3, size, size)`` in [0, 1] and ``y`` int64 ``(n,)``.
    """
    slots = {10: 1, 100: 2, 1000: 3}.get(classes)
    if slots is None:
        raise ValueError(f"classes must be 10, 100 or 1000, got {classes}")
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n).astype(np.int64)
    x = _backgrounds(rng, n, size)
    for j in range(slots):
        digit = (y // 10 ** (slots - 1 - j)) % 10
        centre = (size / 2, size * (j + 0.5) / slots)
        _draw(rng, x, digit, centre, size / slots, 3.0 * size / 32 / slots)
    return np.clip(x, 0, 1).transpose(0, 3, 1, 2).copy(), y
