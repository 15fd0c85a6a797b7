"""Load an untrusted model safely, fingerprint it, and tap its feature layer.

The model contract (docs/design.md): a Python file defining a ``torch.nn.Module`` subclass constructible
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

from guard.errors import InputError, ModelError


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


def _defined_classes(module) -> list[type[nn.Module]]:
    return [c for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, nn.Module) and c.__module__ == module.__name__]


def _state_fits(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` has exactly the model's parameter and buffer names, with the same shapes."""
    own = model.state_dict()
    return set(own) == set(state) and all(tuple(own[k].shape) == tuple(state[k].shape) for k in own)


def _pick_class(path: Path, classes: list[type[nn.Module]],
                state: dict[str, torch.Tensor] | None) -> tuple[type[nn.Module], str]:
    """Choose the network among several ``nn.Module`` classes of one file, and say why.

    The usual model file defines its blocks beside the network. Every class that builds with no
    arguments is instantiated; a class whose instances appear inside another's is a part, not the
    model. Among what is left, the weights decide: the class whose ``state_dict`` has the weights'
    names and shapes. Real ambiguity (two unrelated networks that both fit) still needs ``--model-class``.
    """
    built: dict[type[nn.Module], nn.Module] = {}
    for c in classes:
        try:
            built[c] = c()
        except Exception:  # needs arguments (a block) or fails: not a TorchServe eager-mode model
            continue
    names = ", ".join(c.__name__ for c in classes)
    if not built:
        raise ModelError(f"none of the nn.Module classes in {path} ({names}) can be built without arguments: "
                         "the model file must define its network as a class constructible with no arguments")
    parts = {type(m) for inst in built.values() for m in list(inst.modules())[1:]}
    tops = [c for c in built if c not in parts] or list(built)
    why = "the only class that builds with no arguments" if len(built) == 1 else "the others are its parts"
    if len(tops) > 1 and state is not None:
        fitting = [c for c in tops if _state_fits(built[c], state)]
        if len(fitting) == 1:
            tops, why = fitting, "the only one the weights fit"
        elif fitting:
            tops = fitting
    if len(tops) > 1:
        raise ModelError(f"{path} defines several networks ({', '.join(c.__name__ for c in tops)}) "
                         "and the weights do not tell them apart: pick one with --model-class")
    return tops[0], f"model class {tops[0].__name__} picked among {names}: {why}"


def model_class(model_file: str | Path, class_name: str | None = None, *,
                state: dict[str, torch.Tensor] | None = None,
                notes: list[str] | None = None) -> type[nn.Module]:
    """The ``nn.Module`` subclass defined in ``model_file`` that is the model.

    ``class_name`` picks one explicitly. Otherwise a file with one class gives it; a file with several
    (a network and its blocks) gives the one that is not a part of another, with the weights'
    ``state`` to break a tie (see :func:`_pick_class`); the reason is appended to ``notes``.
    """
    path = Path(model_file)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    module = _import_file(path)
    classes = _defined_classes(module)
    if class_name:
        found = [c for c in classes if c.__name__ == class_name]
        if not found:
            raise ModelError(f"no nn.Module class {class_name!r} in {path} "
                             f"(found: {', '.join(c.__name__ for c in classes) or 'none'})")
        return found[0]
    if not classes:
        raise ModelError(f"no torch.nn.Module subclass defined in {path}")
    if len(classes) == 1:
        return classes[0]
    chosen, why = _pick_class(path, classes, state)
    if notes is not None:
        notes.append(why)
    return chosen


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
               normalize: str | tuple[Sequence[float], Sequence[float]] | None = None,
               notes: list[str] | None = None) -> nn.Module:
    r"""Build the model class from ``model_file``, load ``weights`` strictly, return it in eval mode.

    When the file defines several classes and ``model_class_name`` is not given, the network is picked
    as :func:`model_class` says, and the reason is appended to ``notes`` for the caller to show.

    >>> import pathlib, tempfile, torch
    >>> from guard import load_model
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "model.py").write_text(
    ...     "from torch import nn\n"
    ...     "class Block(nn.Module):\n"
    ...     "    def __init__(self, c=4):\n        super().__init__(); self.conv = nn.Conv2d(c, c, 3, padding=1)\n"
    ...     "    def forward(self, x): return self.conv(x).relu()\n"
    ...     "class Net(nn.Module):\n"
    ...     "    def __init__(self):\n        super().__init__(); self.stem = nn.Conv2d(3, 4, 3, padding=1)\n"
    ...     "        self.block = Block(); self.fc = nn.Linear(4, 2)\n"
    ...     "    def forward(self, x): return self.fc(self.block(self.stem(x)).mean((2, 3)))\n")
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> import importlib.util
    >>> spec = importlib.util.spec_from_file_location("user_model", d / "model.py")
    >>> module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    >>> torch.save(module.Net().state_dict(), d / "weights.pt")
    >>> notes = []
    >>> model = load_model(d / "model.py", d / "weights.pt", notes=notes)
    >>> type(model).__name__, model.training
    ('Net', False)
    >>> notes[0]
    'model class Net picked among Block, Net: the others are its parts'
    """
    if not Path(model_file).is_file():
        raise ModelError(f"model file not found: {model_file}")
    state = load_state_dict(weights)
    cls = model_class(model_file, model_class_name, state=state, notes=notes)
    try:
        model = cls()
    except Exception as e:
        raise ModelError(f"{cls.__name__}() failed: {type(e).__name__}: {e}") from e
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

    >>> import copy, torch
    >>> from guard import fingerprint
    >>> net = torch.nn.Linear(2, 2)
    >>> fingerprint(net) == fingerprint(copy.deepcopy(net)), len(fingerprint(net))
    (True, 64)
    >>> with torch.no_grad():
    ...     net.bias.add_(1e-3)  # doctest: +ELLIPSIS
    Parameter containing:...
    >>> fingerprint(net) == fingerprint(copy.deepcopy(net).requires_grad_(False))
    True
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_PROBE_SIZES = (32, 28, 16, 64, 96, 128, 224)


def probe_input(model: nn.Module, input_shape: Sequence[int] | None = None) -> torch.Tensor:
    """A neutral ``(1, C, H, W)`` input for a probe forward: ``input_shape`` if given, else channels from
    the first ``nn.Conv2d`` and the first square size in a short list that the model accepts."""
    if input_shape is not None:
        return torch.full((1, *map(int, input_shape)), 0.5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ModelError("cannot infer the model's input shape (no nn.Conv2d): pass --input-shape C,H,W "
                         "or name the feature layer with --feature-layer")
    c = int(convs[0].in_channels)
    with frozen(model), torch.no_grad():
        for s in _PROBE_SIZES:
            x = torch.full((1, c, s, s), 0.5)
            try:
                model(x)
            except (RuntimeError, ValueError):
                continue
            return x
    raise ModelError("cannot infer the model's input shape: pass --input-shape C,H,W")


def _leaf_calls(model: nn.Module, x: torch.Tensor, *, leaves: bool = True
                ) -> tuple[list[tuple[str, tuple, tuple]], torch.Tensor]:
    """Leaf modules (every submodule with ``leaves=False``) in the order their forwards return, with
    their input and output shapes, and the logits, of one forward."""
    calls: list[tuple[str, tuple, tuple]] = []
    handles = []

    def hook(name):
        def record(module, args, out):
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                calls.append((name, tuple(args[0].shape), tuple(out.shape)))
        return record

    try:
        for n, m in model.named_modules():
            if n and (not leaves or _is_leaf(m)):
                handles.append(m.register_forward_hook(hook(n)))
        with frozen(model), torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return calls, logits


def find_classifier(model: nn.Module, x: torch.Tensor) -> str:
    """The module whose input is the feature vector, found by one probe forward of ``x``.

    Walking back from the logits ``(N, K)``, modules that keep K channels (global pooling, flatten,
    a BatchNorm over the logits) are the head's tail; the first one that maps something else to K
    channels is the classifier (a 1x1 convolution, a Linear under another name). Its input, pooled
    over space or tokens by :class:`FeatureTap`, is the feature vector.
    """
    calls, logits = _leaf_calls(model, x)
    if logits.ndim != 2:
        raise ModelError(f"the model's output has shape {tuple(logits.shape)}, not (N, classes)")
    k = int(logits.shape[1])
    for name, shape_in, shape_out in reversed(calls):
        if len(shape_out) >= 2 and shape_out[1] == k and (len(shape_in) < 2 or shape_in[1] != k):
            return name
    raise ModelError("cannot find the classifier layer by a probe forward: name the layer whose input is the "
                     "feature vector with --feature-layer")


def feature_layer(model: nn.Module, name: str | None = None, *,
                  input_shape: Sequence[int] | None = None) -> tuple[str, nn.Module]:
    """The module whose *input* is the feature vector.

    ``name`` if given; else the last ``nn.Linear``; else, for heads without one (a 1x1 convolution and
    global pooling), the classifier found by a probe forward (:func:`find_classifier`, with an input
    of ``input_shape`` or one inferred from the first convolution).
    """
    modules = dict(model.named_modules())
    if name:
        if name not in modules:
            raise ModelError(f"--feature-layer {name!r} is not a module of the model")
        return name, modules[name]
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    found = find_classifier(model, probe_input(model, input_shape))
    return found, modules[found]


def pool_features(a: torch.Tensor) -> torch.Tensor:
    """A feature layer's input as ``(N, D)``: spatial maps ``(N, C, H, W)`` are averaged over space,
    token sequences ``(N, T, D)`` over tokens, anything else is flattened."""
    if a.ndim == 4:
        return a.mean((2, 3))
    if a.ndim == 3:
        return a.mean(1)
    return a.flatten(1)


def inner_layer(model: nn.Module, x: torch.Tensor, name: str | None = None, *,
                features: str | None = None) -> str | None:
    """The module whose output the ``consistency`` check reads: the last spatial block before the features.

    Found by one probe forward of ``x``: the last leaf module (in execution order, before the feature
    layer ``features``, by default :func:`feature_layer`'s) whose output is ``(N, C, H, W)`` with
    ``H * W > 1`` (for a CNN, the last convolutional block after its activation and pooling; global
    pooling, a convolutional classifier and later layers are excluded). For a token model (a vision
    transformer, whose only spatial map is its patch embedding) it is the first of its
    :func:`token_blocks`, read as :func:`token_map`: by the last block a patch trigger's token has been
    folded into the target's class evidence (on the glyph ViT with two blocks, k-NN on the second block
    stops about 20% of triggered inputs at 1% of clean, on the first 98%), while after one block it is still
    a token no clean image has. ``name`` overrides the choice. Returns ``None`` where there is no such
    layer, an MLP or a token model without a sequence of blocks (:func:`inner_layer_reason` says why).
    """
    return _inner(model, x, name, features)[0]


def inner_layer_reason(model: nn.Module, x: torch.Tensor, *, features: str | None = None) -> str | None:
    """Why :func:`inner_layer` finds no layer for ``model`` (None when it finds one)."""
    return _inner(model, x, None, features)[1]


def _inner(model: nn.Module, x: torch.Tensor, name: str | None,
           features: str | None) -> tuple[str | None, str | None]:
    modules = dict(model.named_modules())
    if name:
        if name not in modules:
            raise ModelError(f"--inner-layer {name!r} is not a module of the model")
        return name, None
    features = features or feature_layer(model, input_shape=tuple(x.shape[1:]))[0]
    every, _ = _leaf_calls(model, x[:1], leaves=False)  # one probe: the leaves and the blocks
    every = _before(every, features)
    calls = [c for c in every if _is_leaf(modules[c[0]])]
    spatial = [i for i, (_, _, out) in enumerate(calls) if len(out) == 4 and out[2] * out[3] > 1]
    if not spatial:
        return None, "the model has no spatial feature map (N, C, H, W) before its features"
    last = spatial[-1]
    if any(len(out) == 3 for _, _, out in calls[last + 1:]):
        blocks = _token_blocks(modules, every)
        if not blocks:
            return None, (f"a token model: its last spatial map ({calls[last][0]}) is the patch embedding, "
                          "and no block of a sequence (nn.Sequential, nn.ModuleList) maps its tokens "
                          "before the features: name one with --inner-layer")
        return blocks[0], None
    return calls[last][0], None


def _is_leaf(m: nn.Module) -> bool:
    return not any(True for _ in m.children())


def _before(calls: list[tuple[str, tuple, tuple]], features: str) -> list[tuple[str, tuple, tuple]]:
    """The probe's calls that return before the feature layer ``features`` (or one of its parts) runs."""
    first = next((i for i, (n, _, _) in enumerate(calls) if n == features or n.startswith(features + ".")), None)
    return calls[:first]


def token_blocks(model: nn.Module, x: torch.Tensor, features: str) -> list[str]:
    """A token model's blocks, in order: the modules with submodules that are items of an
    ``nn.Sequential`` or ``nn.ModuleList`` and return a token sequence ``(N, T, D)`` (``T > 1``) before
    the feature layer ``features`` runs (a vision transformer's encoder blocks; the layers inside a
    block are not items of a sequence, or have no submodules)."""
    return _token_blocks(dict(model.named_modules()), _before(_leaf_calls(model, x, leaves=False)[0], features))


def _token_blocks(modules: dict[str, nn.Module], calls: list[tuple[str, tuple, tuple]]) -> list[str]:
    out = []
    for name, _, shape in calls:
        parent = modules.get(name.rpartition(".")[0]) if "." in name else None
        if (len(shape) == 3 and shape[1] > 1 and isinstance(parent, (nn.Sequential, nn.ModuleList))
                and not _is_leaf(modules[name])):
            out.append(name)
    return out


class HookSet:
    """Forward hooks registered together and always removed together: ``__enter__`` calls
    :meth:`_register` (which appends each handle to ``_handles``) and, should it fail half-way, removes
    what it registered; ``__exit__`` removes every handle."""

    _handles: list

    def _register(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def __enter__(self):
        try:
            self._register()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        while self._handles:
            self._handles.pop().remove()


class FeatureTap(HookSet):
    """Context manager that records the input of the feature layer on every forward, as ``(N, D)``
    (:func:`pool_features` pools spatial maps and token sequences).

    The hook is registered on ``__enter__`` and always removed on ``__exit__``, exceptions included.
    ``features`` holds the last batch's features ``(N, D)`` (with gradient if the forward had one).
    With ``inner`` (a module, see :func:`inner_layer`) a second hook keeps that module's output of
    the last batch in ``inner``, an unpooled tensor (``(N, C, H, W)``; :func:`guard.online.checks.pool` pools it).

    >>> import torch
    >>> from guard import FeatureTap
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
    ...                           torch.nn.Flatten(), torch.nn.Linear(8, 10))
    >>> with torch.no_grad(), FeatureTap(net) as tap:  # the input of the last nn.Linear
    ...     logits = net(torch.rand(4, 3, 16, 16))
    >>> tuple(tap.features.shape), len(net[4]._forward_pre_hooks)  # the hook is gone after the block
    ((4, 8), 0)
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
        a = args[0]
        self.features = a if a.ndim == 2 else pool_features(a)

    def _inner_hook(self, module, args, out):
        self.inner = token_map(out) if out.ndim == 3 else out

    def _register(self) -> None:
        self._handles.append(self.module.register_forward_pre_hook(self._hook))
        if self._inner_module is not None:
            self._handles.append(self._inner_module.register_forward_hook(self._inner_hook))


def token_map(t: torch.Tensor) -> torch.Tensor:
    """A token block's output ``(N, T, D)`` as a map ``(N, 2D, T, 1)`` the inner-layer checks pool like a
    CNN's: each dimension and its negation a channel over the tokens, so the pooled row holds every
    dimension's mean, largest and smallest value over the tokens. A CNN's maps follow a ReLU and their
    smallest value says little; a transformer's residual stream is signed, and a patch trigger shows as
    one token far out on either side (on the glyph ViT's first block, k-NN on mean and max alone stops
    93% of triggered inputs at 1% of clean, 98% with the negation)."""
    t = t.transpose(1, 2)
    return torch.cat((t, -t), 1).unsqueeze(3)


def num_classes(model: nn.Module, x: np.ndarray | torch.Tensor | Sequence[int]) -> int:
    """How many classes ``model`` scores: the width of its output for one input.

    ``x`` is a batch (numpy or torch, on the model's device; its first input is used) or an input
    shape ``(C, H, W)`` (a zero image is used). One forward in eval mode, no gradient; the model's
    mode and gradient flags come back as they were.
    """
    if isinstance(x, torch.Tensor):
        probe = x[:1]
    elif isinstance(x, np.ndarray):
        probe = torch.from_numpy(np.ascontiguousarray(x[:1], dtype=np.float32))
    else:
        probe = torch.zeros((1, *(int(s) for s in x)))
    with frozen(model), torch.no_grad():
        return int(model(probe).shape[1])


def check_labels(y: np.ndarray | None, k: int) -> None:
    """InputError unless every label of ``y`` is one of the model's ``k`` classes (``0 .. k - 1``)."""
    if y is None or not np.size(y):
        return
    lo, hi = int(np.min(y)), int(np.max(y))
    if lo < 0 or hi >= k:
        raise InputError(f"data labels go from {lo} to {hi} but the model has {k} classes (0..{k - 1})")


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
