"""A stateful check: a trigger is the same on every query that carries it, clean images are not.

Every backdoor whose trigger is one fixed pattern (a patch, a blended key, a key re-optimised by an
attacker who knows the per-input checks) pastes the *same* pixels into every query it attacks, while
the content around it changes. The high-frequency residual of an image (each pixel minus the mean of
its four neighbours) keeps a blended key almost whole and most of a glyph's or photo's content out,
so two triggered queries' residuals correlate where two clean queries' hardly do. The memory keeps the
residuals of the last ``size`` queries the guard saw and scores a new query by its largest cosine
similarity to them; a near-duplicate of a remembered query (the same image sent again, consecutive
video frames) is not counted, since its content matches too.

What it cannot see: the first triggered query (nothing to match yet), triggers that change with the
input (WaNet's warp moves each image's own edges; input-aware generators), and an attacker who adds
fresh noise of the trigger's strength to every query (which halves the correlation). It is per
process: a serving worker remembers its own share of the traffic.

The residual is read at ``n_features`` pixel-channel positions drawn from ``seed`` when the memory is
fitted (a deployment's secret: an attacker without the profile cannot tell which pixels are compared).
``infer_threshold`` replays clean images against a memory of other clean images and sets the threshold
that lets ``fpr`` of them through.

>>> import numpy as np
>>> from guard.demo.glyphs import glyphs
>>> clean, _ = glyphs(300, seed=0)
>>> mem = TriggerMemory(size=64).fit(clean[:200]).infer_threshold(clean[200:], fpr=0.01)
>>> key = np.random.default_rng(0).random(clean.shape[1:], dtype=np.float32)
>>> triggered = (0.75 * clean[:20] + 0.25 * key).astype(np.float32)
>>> _ = mem.update(triggered[:1])  # one triggered query seen
>>> bool((mem.score(triggered[1:]) > mem.threshold_).mean() > 0.9)
True
"""

from __future__ import annotations

import threading

import numpy as np


def _unit(v: np.ndarray) -> np.ndarray:
    v = v - v.mean(1, keepdims=True)
    return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-8)).astype(np.float32)


class TriggerMemory:
    """The repeated-trigger check: ``fit`` on clean images, ``infer_threshold(x, fpr=...)``, then per batch
    ``score(x)`` (largest residual similarity to the remembered queries, higher = more suspect) and
    ``update(x)`` (remember them); :meth:`observe` does both, comparing each input with the memory and
    with the inputs before it in the same batch.

    Parameters
    ----------
    size:
        How many recent queries are remembered (a ring buffer).
    n_features:
        Pixel-channel positions of the residual compared (drawn at ``fit`` from ``seed``).
    duplicate:
        Content similarity (cosine of the centred, 4x4-pooled images) over which a remembered query counts
        as the same image and is ignored.
    seed:
        Draws the positions; keep it with the deployment, not in public configuration.

    Learned: ``index_`` (the positions, flat in ``(C, H, W)``), ``neighbours_`` (their 3 x 3 neighbourhoods,
    flat in ``(C, H, W)``, edges replicated), ``threshold_`` and ``fpr_``.
    """

    def __init__(self, *, size: int = 256, n_features: int = 1536, duplicate: float = 0.98, seed: int = 0):
        self.size = size
        self.n_features = n_features
        self.duplicate = duplicate
        self.seed = seed

    def fit(self, x: np.ndarray) -> TriggerMemory:
        """Draw the compared positions for images shaped like ``x`` and start with an empty memory."""
        c, h, w = (int(v) for v in x.shape[1:])
        rng = np.random.default_rng(self.seed)
        self.index_ = np.sort(rng.choice(c * h * w, size=min(self.n_features, c * h * w), replace=False))
        ch, i, j = np.unravel_index(self.index_, (c, h, w))
        di, dj = np.meshgrid(np.arange(-1, 2), np.arange(-1, 2), indexing="ij")  # edges replicated
        self.neighbours_ = np.ravel_multi_index((ch[:, None], np.clip(i[:, None] + di.ravel(), 0, h - 1),
                                                 np.clip(j[:, None] + dj.ravel(), 0, w - 1)), (c, h, w))
        for stale in ("threshold_", "fpr_"):  # a threshold calibrated before this fit no longer holds
            self.__dict__.pop(stale, None)
        self.reset()
        return self

    def reset(self) -> TriggerMemory:
        """Forget every remembered query."""
        self._res = np.zeros((self.size, len(self.index_)), dtype=np.float32)
        self._content = np.zeros((self.size, 0), dtype=np.float32)
        self._filled = 0
        self._next = 0
        self._lock = threading.Lock()  # one memory per serving worker; its threads take turns
        return self

    def residual(self, x: np.ndarray) -> np.ndarray:
        """``(N, n_features)`` the high-frequency residual at the drawn positions: pixel minus its 3 x 3
        neighbourhood's median (edges replicated)."""
        flat = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
        return flat[:, self.index_] - np.partition(flat[:, self.neighbours_], 4, axis=2)[:, :, 4]

    def _rows(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float32)
        res = _unit(self.residual(x))
        n, c, h, w = x.shape
        pooled = x[:, :, : h - h % 4, : w - w % 4].reshape(n, c, 4, h // 4, 4, w // 4).mean((3, 5))
        return res, _unit(pooled.reshape(n, -1))

    def _against(self, res: np.ndarray, content: np.ndarray, mem_res: np.ndarray, mem_content: np.ndarray
                 ) -> np.ndarray:
        if len(mem_res) == 0:
            return np.zeros(len(res), dtype=np.float32)
        sim = res @ mem_res.T
        sim[content @ mem_content.T > self.duplicate] = -1.0
        return sim.max(1)

    def _memory(self) -> tuple[np.ndarray, np.ndarray]:
        return self._res[: self._filled], self._content[: self._filled]

    def score(self, x: np.ndarray) -> np.ndarray:
        """``(N,)`` each input's largest residual similarity to the remembered queries (memory unchanged)."""
        res, content = self._rows(x)
        with self._lock:
            return self._against(res, content, *self._memory())

    def update(self, x: np.ndarray) -> TriggerMemory:
        """Remember the inputs of ``x`` (the oldest are forgotten past ``size``)."""
        res, content = self._rows(x)
        with self._lock:
            self._push(res, content)
        return self

    def _push(self, res: np.ndarray, content: np.ndarray) -> None:
        if self._content.shape[1] != content.shape[1]:
            self._content = np.zeros((self.size, content.shape[1]), dtype=np.float32)
        for r, c in zip(res[-self.size:], content[-self.size:]):
            self._res[self._next], self._content[self._next] = r, c
            self._next = (self._next + 1) % self.size
            self._filled = min(self._filled + 1, self.size)

    def observe(self, x: np.ndarray) -> np.ndarray:
        """Score each input against the memory and the batch's earlier inputs, then remember them all."""
        res, content = self._rows(x)
        out = np.empty(len(res), dtype=np.float32)
        with self._lock:
            for i in range(len(res)):
                out[i] = self._against(res[i:i + 1], content[i:i + 1], *self._memory())[0]
                self._push(res[i:i + 1], content[i:i + 1])
        return out

    SETTINGS = ("size", "n_features", "duplicate", "seed")

    def to_settings(self) -> dict[str, float | int]:
        """The calibrated memory as a profile stores it (JSON numbers): its parameters, threshold and FPR."""
        if getattr(self, "threshold_", None) is None:
            raise ValueError("the trigger memory is not calibrated: call infer_threshold first")
        return {k: getattr(self, k) for k in self.SETTINGS} | {"threshold": self.threshold_, "fpr": self.fpr_}

    @classmethod
    def from_settings(cls, settings: dict, input_shape: tuple[int, ...]) -> TriggerMemory:
        """A calibrated, empty memory for inputs of ``input_shape`` from :meth:`to_settings`' output (the
        positions are drawn again from the seed)."""
        mem = cls(size=int(settings["size"]), n_features=int(settings["n_features"]),
                  duplicate=float(settings["duplicate"]), seed=int(settings["seed"]))
        mem.fit(np.zeros((1, *input_shape), dtype=np.float32))
        mem.threshold_, mem.fpr_ = float(settings["threshold"]), float(settings["fpr"])
        return mem

    def infer_threshold(self, x: np.ndarray, *, fpr: float) -> TriggerMemory:
        """Replay clean ``x``: each image scored against a full memory of other clean images; the threshold
        lets ``fpr`` of them through. The memory is empty afterwards."""
        from guard.stats import upper_threshold

        res, content = self._rows(x)
        n = len(res)
        if n < 2:
            raise ValueError("infer_threshold needs at least two clean images")
        scores = np.empty(n, dtype=np.float32)
        for i in range(n):  # the memory: the `size` images before i (wrapping round), never i itself
            others = (i + 1 + np.arange(min(self.size, n - 1))) % n
            scores[i] = self._against(res[i:i + 1], content[i:i + 1], res[others], content[others])[0]
        self.threshold_ = float(upper_threshold(scores, fpr))
        self.fpr_ = float(fpr)
        self.reset()
        return self
