"""Load an untrusted model safely: its class from a Python file, its weights with ``weights_only=True``.

The model contract (docs/design.md): a Python file defining a ``torch.nn.Module`` subclass constructible
with no arguments, plus a ``state_dict`` file loaded with ``weights_only=True``. Input is
``(N, C, H, W)`` in [0, 1]; normalisation, when the model expects it, happens inside
:class:`Normalized` so masks and patterns always live in raw pixel space.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

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
