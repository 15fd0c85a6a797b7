"""Datasets: validated ``.npz`` and image-folder loaders, a seeded stratified split and stratified folds.

The data contract (docs/design.md): ``x`` float32 ``(N, C, H, W)`` in [0, 1] and ``y`` int64 ``(N,)``;
the same range and shape checks as every guarded call (:func:`guard.inputs.validate_batch`). The
demo worlds' generators live in :mod:`guard.demo`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from guard.errors import InputError
from guard.inputs import validate_batch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


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


def stratified_folds(y: np.ndarray, folds: int, *, seed: int = 0) -> list[np.ndarray]:
    """Seeded stratified partition of ``range(len(y))`` into ``folds`` index arrays (each sorted): every class's
    images are shuffled and dealt round-robin from a random fold on, so fold sizes per class differ by at most
    one and every image is in exactly one fold."""
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(folds)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = int(rng.integers(folds))
        for f in range(folds):
            parts[(start + f) % folds].append(idx[f::folds])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def validate_per_class(y: np.ndarray, k: int, minimum: int) -> None:
    """InputError unless each of the ``k`` classes has at least ``minimum`` images in ``y`` (0: no minimum).

    The message names how many classes are short and the first few with their counts, and what helps."""
    if minimum <= 0:
        return
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=k)[:k]
    short = np.flatnonzero(counts < minimum)
    if len(short):
        shown = ", ".join(f"{c} ({counts[c]})" for c in short[:8])
        more = f" and {len(short) - 8} more" if len(short) > 8 else ""
        raise InputError(f"{len(short)} of {k} classes have fewer than {minimum} clean images (class (images): "
                         f"{shown}{more}); add images of those classes, or lower --min-per-class (0 scans "
                         "anyway: the checks are then not calibrated for those classes)")
