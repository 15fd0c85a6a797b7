"""Datasets: validated ``.npz`` and image-folder loaders, and the bundled demo worlds.

The data contract (DESIGN.md): ``x`` float32 ``(N, C, H, W)`` in [0, 1] and ``y`` int64 ``(N,)``.
The demo worlds are built from what packages ship, so nothing is downloaded: scikit-learn's digits,
and *glyphs*, a 10-class colour task of sign-like shapes composited on crops of scikit-learn's sample
photos, where changing a class takes many pixels (so a 3x3 trigger is the cheapest way to a label).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import _numba
from .errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _numpy_in_unit_range(x: np.ndarray) -> bool:
    return bool((x >= 0.0).all() and (x <= 1.0).all())  # NaN fails both comparisons


if _numba.njit is not None:

    @_numba.compiled(nogil=True)
    def _unit_range_kernel(flat):  # pragma: no cover - compiled
        for i in range(flat.shape[0]):
            v = flat[i]
            if not (v >= 0.0 and v <= 1.0):  # NaN fails both comparisons
                return False
        return True

    def _in_unit_range(x: np.ndarray) -> bool:
        """Every value in [0, 1] (NaN and inf are not): one compiled pass instead of four numpy calls."""
        return _unit_range_kernel(x.reshape(-1)) if x.flags.c_contiguous else _numpy_in_unit_range(x)
else:  # pragma: no cover - without numba
    _in_unit_range = _numpy_in_unit_range


def validate_batch(x: np.ndarray, *, shape: tuple[int, ...] | None = None, what: str = "x") -> np.ndarray:
    """Check a batch is ``(N, C, H, W)``, finite and in [0, 1]; return it as float32."""
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise InputError(f"{what} must be numeric, got dtype {x.dtype}")
    if x.ndim != 4:
        raise InputError(f"{what} must be (N, C, H, W), got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise InputError(f"{what} has per-image shape {tuple(x.shape[1:])}, the model takes {tuple(shape)}")
    if x.shape[0] == 0:
        raise InputError(f"{what} is empty")
    x = x.astype(np.float32, copy=False)
    if not _in_unit_range(x):
        if not np.isfinite(x).all():
            raise InputError(f"{what} contains NaN or inf")
        raise InputError(f"{what} values must lie in [0, 1] (got {x.min():.3g}..{x.max():.3g})")
    return x


def load_npz(path: str | Path, *, shape: tuple[int, ...] | None = None,
             need_labels: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Load ``x`` and ``y`` from an ``.npz`` file (never unpickling) and validate them."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files:
                raise InputError(f"{path} has no array 'x' (found: {', '.join(f.files) or 'none'})")
            x = f["x"]
            y = f["y"] if "y" in f.files else None
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read {path} as .npz: {type(e).__name__}: {e}") from e
    x = validate_batch(x, shape=shape, what=f"{path.name}:x")
    if y is None:
        if need_labels:
            raise InputError(f"{path} has no array 'y' of labels")
        return x, None
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != x.shape[0] or y.dtype.kind not in "iu":
        raise InputError(f"{path.name}:y must be integer labels of shape ({x.shape[0]},), "
                         f"got {y.dtype} {tuple(y.shape)}")
    if (y < 0).any():
        raise InputError(f"{path.name}:y has negative labels")
    return x, y.astype(np.int64)


def load_image_folder(path: str | Path, *, channels: int = 3,
                      size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load a folder of class-named subfolders of PNG/JPEG images; labels follow sorted folder names."""
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise InputError(f"{root} has no class subfolders")
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if channels == 1 else "RGB")
                    if size is not None:
                        im = im.resize((size[1], size[0]), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except Exception as e:
                raise InputError(f"cannot read image {f}: {e}") from e
            xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise InputError(f"{root} holds no PNG/JPEG images")
    shapes = {a.shape for a in xs}
    if len(shapes) > 1:
        raise InputError(f"images in {root} differ in size {sorted(shapes)[:3]}: pass a size to resize them")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes


def load_data(path: str | Path, *, shape: tuple[int, ...] | None = None,
              need_labels: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Load ``.npz`` or an image folder, whichever ``path`` is."""
    p = Path(path)
    if p.is_dir():
        ch = shape[0] if shape else 3
        size = tuple(shape[1:]) if shape else None
        x, y, _ = load_image_folder(p, channels=ch, size=size)  # type: ignore[arg-type]
        return validate_batch(x, shape=shape), y
    return load_npz(p, shape=shape, need_labels=need_labels)


def split(x: np.ndarray, y: np.ndarray, fraction: float, *, seed: int = 0):
    """Seeded stratified split: returns ``(x_a, y_a, x_b, y_b)`` with ``fraction`` of each class in a."""
    rng = np.random.default_rng(seed)
    a_idx, b_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * fraction))
        a_idx.append(idx[:k])
        b_idx.append(idx[k:])
    a = np.sort(np.concatenate(a_idx))
    b = np.sort(np.concatenate(b_idx))
    return x[a], y[a], x[b], y[b]


# ---------------------------------------------------------------- demo worlds

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


def glyphs(n: int, *, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``n`` seeded 3 x ``size`` x ``size`` images of 10 glyph classes on crops of the sample photos.

    Each image: a random photo crop (random scale, flip, brightness), then a glyph whose shape is the
    class, with random colour, position jitter, radius and rotation, drawn with a dark outline like a
    road sign. Returns ``x`` float32 ``(n, 3, size, size)`` in [0, 1] and ``y`` int64 ``(n,)``.
    """
    rng = np.random.default_rng(seed)
    photos = _photos()
    y = rng.integers(0, 10, size=n).astype(np.int64)
    x = np.empty((n, size, size, 3), dtype=np.float32)
    for i in range(n):
        p = photos[rng.integers(len(photos))]
        r0 = rng.integers(0, p.shape[0] - size + 1)
        c0 = rng.integers(0, p.shape[1] - size + 1)
        crop = p[r0:r0 + size, c0:c0 + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        x[i] = np.clip(crop * rng.uniform(0.6, 1.2), 0, 1)
    grid = (np.arange(size, dtype=np.float32) + 0.5)
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    for c in range(10):
        idx = np.flatnonzero(y == c)
        if idx.size == 0:
            continue
        m = idx.size
        cx = size / 2 + rng.uniform(-3, 3, m).astype(np.float32)
        cy = size / 2 + rng.uniform(-3, 3, m).astype(np.float32)
        rad = rng.uniform(0.26, 0.36, m).astype(np.float32) * size
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
    return np.clip(x, 0, 1).transpose(0, 3, 1, 2).copy(), y
