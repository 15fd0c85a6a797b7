"""What a model is made of, found by probing it: its input shape, its class count, its classifier, the
feature layer the online checks read, the inner layer one block earlier, a transformer's token blocks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from guard.errors import InputError, ModelError
from guard.model.evaluation import frozen

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


def input_shape(x: torch.Tensor) -> tuple[int, int, int]:
    """``(C, H, W)`` of a batch."""
    return tuple(int(s) for s in x.shape[1:])  # type: ignore[return-value]


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


def _leaf_calls(model: nn.Module, x: torch.Tensor, *, leaves: bool = True
                ) -> tuple[list[tuple[str, tuple, tuple]], torch.Tensor]:
    """Leaf modules (every submodule with ``leaves=False``) in the order their forwards return, with
    their input and output shapes, and the logits, of one forward."""
    calls: list[tuple[str, tuple, tuple]] = []
    handles = []

    def hook(name):
        def keep(module, args, out):
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                calls.append((name, tuple(args[0].shape), tuple(out.shape)))
        return keep

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
    folded into the target's class evidence, while after one block it is still a token no clean image
    has; on the glyph ViT the first block's tokens separate triggered inputs far better than the last
    block's (figures: docs/benchmarks.md, 'Measurements behind the defaults'). ``name`` overrides the
    choice. Returns ``None`` where there is no such layer, an MLP or a token model without a sequence of
    blocks (:func:`inner_layer_reason` says why).
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


def token_map(t: torch.Tensor) -> torch.Tensor:
    """A token block's output ``(N, T, D)`` as a map ``(N, 2D, T, 1)`` the inner-layer checks pool like a
    CNN's: each dimension and its negation a channel over the tokens, so the pooled row holds every
    dimension's mean, largest and smallest value over the tokens. A CNN's maps follow a ReLU and their
    smallest value says little; a transformer's residual stream is signed, and a patch trigger shows as
    one token far out on either side, which mean and max alone see on the positive side only; with the
    negation k-NN on the glyph ViT's first block stops more triggered inputs (figures:
    docs/benchmarks.md, 'Measurements behind the defaults')."""
    t = t.transpose(1, 2)
    return torch.cat((t, -t), 1).unsqueeze(3)


def validate_input_shape(model: nn.Module, data_shape: Sequence[int]) -> None:
    """InputError unless ``model`` takes one zero image of ``data_shape`` ``(C, H, W)`` and returns
    ``(N, classes)`` logits: a shape mismatch becomes one readable line instead of a stack trace."""
    try:
        with torch.no_grad():
            out = model(torch.zeros((1, *(int(s) for s in data_shape))))
    except Exception as e:
        raise InputError(f"the model does not accept inputs of shape {tuple(data_shape)}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    if out.ndim != 2:
        raise InputError(f"the model must return (N, classes) logits, got shape {tuple(out.shape)}")
