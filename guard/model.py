"""Load an untrusted model safely, fingerprint it, and tap its feature layer.

The model contract (DESIGN.md): a Python file defining a ``torch.nn.Module`` subclass constructible
with no arguments, plus a ``state_dict`` file loaded with ``weights_only=True``. Input is
``(N, C, H, W)`` in [0, 1]; normalisation, when the model expects it, happens inside
:class:`Normalized` so masks and patterns always live in raw pixel space.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from guard.errors import ModelError


class Normalized(nn.Module):
    """Wrap a model that expects normalised input: ``forward(x) = model((x - mean) / std)``."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def parse_normalize(text: str | None) -> tuple[list[float], list[float]] | None:
    """Parse ``--normalize MEAN,STD`` where each side is one number or ``a/b/c`` per channel."""
    if not text:
        return None
    try:
        mean_s, std_s = text.split(",")
        mean = [float(v) for v in mean_s.split("/")]
        std = [float(v) for v in std_s.split("/")]
    except ValueError:
        raise ModelError(f"--normalize expects MEAN,STD (e.g. 0.5,0.25 or 0.4/0.4/0.4,0.2/0.2/0.2), "
                         f"got {text!r}") from None
    if any(s <= 0 for s in std):
        raise ModelError("--normalize: every std must be > 0")
    return mean, std


def _import_file(path: Path):
    name = f"guard_user_model_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot import model file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file may fail in any way; report it as one line
        sys.modules.pop(name, None)
        raise ModelError(f"model file {path} failed to import: {type(e).__name__}: {e}") from e
    return module


def model_class(model_file: str | Path, class_name: str | None = None) -> type[nn.Module]:
    """The ``nn.Module`` subclass defined in ``model_file`` (``class_name`` picks one if several)."""
    path = Path(model_file)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    module = _import_file(path)
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, nn.Module) and c.__module__ == module.__name__]
    if class_name:
        found = [c for c in classes if c.__name__ == class_name]
        if not found:
            raise ModelError(f"no nn.Module class {class_name!r} in {path} "
                             f"(found: {', '.join(c.__name__ for c in classes) or 'none'})")
        return found[0]
    if not classes:
        raise ModelError(f"no torch.nn.Module subclass defined in {path}")
    if len(classes) > 1:
        raise ModelError(f"{path} defines several nn.Module classes "
                         f"({', '.join(c.__name__ for c in classes)}): pick one with --model-class")
    return classes[0]


def load_state_dict(weights: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``state_dict`` without unpickling arbitrary objects (``weights_only=True``)."""
    path = Path(weights)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"cannot read weights {path} as a state_dict: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights {path} is not a state_dict of tensors")
    return state


def load_model(model_file: str | Path, weights: str | Path, *, model_class_name: str | None = None,
               normalize: str | tuple[Sequence[float], Sequence[float]] | None = None) -> nn.Module:
    """Build the model class from ``model_file``, load ``weights`` strictly, return it in eval mode."""
    cls = model_class(model_file, model_class_name)
    try:
        model = cls()
    except Exception as e:
        raise ModelError(f"{cls.__name__}() failed: {type(e).__name__}: {e}") from e
    state = load_state_dict(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ModelError(f"weights do not fit {cls.__name__}: {' '.join(first[:3])[:300]}") from e
    if isinstance(normalize, str):
        normalize = parse_normalize(normalize)
    if normalize is not None:
        model = Normalized(model, *normalize)
    return model.eval()


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers: names, dtypes, shapes and raw bytes, sorted.

    Hashing the loaded tensors (not the file bytes) binds a profile to what the model computes, so
    re-saving the same weights or archiving them for TorchServe keeps the fingerprint.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def feature_layer(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """The module whose *input* is the feature vector: the last ``nn.Linear`` unless ``name`` is given."""
    modules = dict(model.named_modules())
    if name:
        if name not in modules:
            raise ModelError(f"--feature-layer {name!r} is not a module of the model")
        return name, modules[name]
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError("the model has no nn.Linear layer: name the feature layer with --feature-layer")
    return linears[-1]


def inner_layer(model: nn.Module, x: torch.Tensor, name: str | None = None) -> str | None:
    """The module whose output the ``consistency`` check reads: the last spatial block before the features.

    Found by one probe forward of ``x``: the last leaf module (in execution order) whose output is
    ``(N, C, H, W)`` with ``H * W > 1`` (for a CNN, the last convolutional block after its activation
    and pooling; global pooling and later layers are excluded). ``name`` overrides the choice. Returns
    ``None`` for a model with no such layer (an MLP): the check is then left out.
    """
    modules = dict(model.named_modules())
    if name:
        if name not in modules:
            raise ModelError(f"--inner-layer {name!r} is not a module of the model")
        return name
    seen: list[str] = []
    handles = []

    def hook(module_name):
        def record(module, args, out):
            if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[2] * out.shape[3] > 1:
                seen.append(module_name)
        return record

    try:
        for n, m in modules.items():
            if n and not any(True for _ in m.children()):
                handles.append(m.register_forward_hook(hook(n)))
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return seen[-1] if seen else None


def pool_inner(a: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` activations to ``(N, 2C)`` float32: each channel's spatial mean, then its spatial max.

    One input is pooled in numpy (a few microseconds; torch's per-op dispatch costs more at that
    size), a batch in torch (numpy's reductions over a short last axis are 3x slower there).
    """
    if a.shape[0] == 1:
        r = a.numpy().reshape(1, a.shape[1], -1)
        return np.concatenate((r @ np.full(r.shape[2], 1.0 / r.shape[2], np.float32), r.max(2)), 1)
    f = a.reshape(a.shape[0], a.shape[1], -1)
    return torch.cat((f.mean(2), f.amax(2)), 1).numpy()


class FeatureTap:
    """Context manager that records the flattened input of the feature layer on every forward.

    The hook is registered on ``__enter__`` and always removed on ``__exit__``, exceptions included.
    ``features`` holds the last batch's features ``(N, D)`` (with gradient if the forward had one).
    With ``inner`` (a module, see :func:`inner_layer`) a second hook keeps that module's output of
    the last batch in ``inner``, an unpooled tensor (``(N, C, H, W)``; :func:`pool_inner` pools it).
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None, *, inner: nn.Module | None = None):
        if isinstance(layer, nn.Module):  # already resolved (the online hot path resolves it once)
            self.name, self.module = "", layer
        else:
            self.name, self.module = feature_layer(model, layer)
        self.features: torch.Tensor | None = None
        self.inner: torch.Tensor | None = None
        self._inner_module = inner
        self._handles: list = []

    def _hook(self, module, args):
        self.features = args[0].flatten(1)

    def _inner_hook(self, module, args, out):
        self.inner = out

    def __enter__(self) -> FeatureTap:
        try:
            self._handles.append(self.module.register_forward_pre_hook(self._hook))
            if self._inner_module is not None:
                self._handles.append(self._inner_module.register_forward_hook(self._inner_hook))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        while self._handles:
            self._handles.pop().remove()


def input_shape(x: torch.Tensor) -> tuple[int, int, int]:
    """``(C, H, W)`` of a batch."""
    return tuple(int(s) for s in x.shape[1:])  # type: ignore[return-value]


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """Predicted labels of ``x`` in eval mode, batched."""
    out = []
    for i in range(0, len(x), batch_size):
        out.append(model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size]))).argmax(1))
    return torch.cat(out).numpy()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Share of ``x`` the model labels ``y``."""
    return float((predict(model, x) == y).mean())


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Eval mode and no parameter gradients for the duration; restores both on exit.

    Scans optimise inputs, never weights: BatchNorm statistics and dropout must not move, and the
    caller's ``requires_grad`` flags and train/eval mode come back exactly as they were.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)
