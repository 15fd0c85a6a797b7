"""Offline repair of a suspected model: Fine-Pruning and Neural Cleanse unlearning.

**Fine-Pruning** (Liu et al., RAID 2018): a backdoor tends to live in channels of the last
convolutional layer that clean inputs leave dormant. Channels are pruned in order of increasing mean
activation on clean data, step by step, for as long as clean accuracy stays within ``max_drop`` of
where it started; the model is then fine-tuned briefly on clean data with the pruned channels held
at zero.

**Unlearning** (Wang et al., S&P 2019): fine-tune on clean data where a share (default 20%) of each
batch is stamped with a suspect label's reversed trigger and kept at its true label, so the model
learns that the trigger means nothing. The reversed trigger is one trigger that works, not the
attacker's (docs/design.md): it usually covers part of the real patch and a few pixels beside it, so each
stamp is moved by up to ``jitter`` pixels; that unlearns the neighbourhood the real trigger sits in
(on the seed-3 demo: true-trigger attack success 0.99 -> 0.084 with jitter 1, 0.024 with 2).

Both are estimators (:func:`guard.repair.run.repair` runs them, and the other methods, within a
bound on the clean-accuracy drop): keyword-only hyperparameters, ``fit(model, x, y)`` returns ``self`` and never
touches the caller's model; the repaired copy is ``model_`` and ``state_dict_`` loads into the
original model file (pruned channels are zeroed, so every shape stays).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from guard._progress import Progress
from guard.data import split
from guard.errors import InputError
from guard.model import Normalized, accuracy, predict
from guard.repair.triggers import shift
from guard.scan.trigger import stamp


def last_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The last ``nn.Conv2d`` in module order (Fine-Pruning's layer)."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise InputError("fine-pruning needs a convolutional layer (nn.Conv2d); the model has none")
    return convs[-1]


def _following_norm(model: nn.Module, conv_name: str, channels: int) -> nn.Module | None:
    """A BatchNorm2d right after the conv in module order, whose affine shift would refill a pruned channel."""
    names = [n for n, _ in model.named_modules()]
    modules = dict(model.named_modules())
    i = names.index(conv_name)
    for n in names[i + 1:i + 3]:
        m = modules[n]
        if isinstance(m, nn.BatchNorm2d) and m.num_features == channels:
            return m
        if isinstance(m, nn.Conv2d | nn.Linear):
            break
    return None


def bare(model: nn.Module) -> nn.Module:
    """The user's module inside guard's normalisation wrapper (whose state_dict the user's file loads)."""
    return model.model if isinstance(model, Normalized) else model


@torch.no_grad()
def channel_activation(model: nn.Module, layer: nn.Module, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Mean ReLU'd output of ``layer`` per channel over ``x`` (what "dormant on clean data" means)."""
    acc: list[torch.Tensor] = []

    def hook(_m, _i, out):
        acc.append(out.clamp_min(0).mean(dim=(0, 2, 3)) * out.shape[0])

    handle = layer.register_forward_hook(hook)
    was = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])))
    finally:
        handle.remove()
        model.train(was)
    return (torch.stack(acc).sum(0) / len(x)).numpy()


def trigger_success(model: nn.Module, x: np.ndarray, y: np.ndarray, label: int, mask: np.ndarray,
                    pattern: np.ndarray) -> float:
    """Share of images not of ``label`` that the stamped trigger sends to ``label``."""
    keep = y != label
    if not keep.any():
        return float("nan")
    return float((predict(model, stamp(x[keep], mask, pattern)) == label).mean())


def finetune(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, batch_size: int,
             seed: int, triggers: list[tuple[np.ndarray, np.ndarray]] | None = None, share: float = 0.0,
             jitter: int = 0, after_step=None, progress: bool | None = None,
             label: str = "finetune") -> nn.Module:
    """Adam fine-tuning in place; with ``triggers``, ``share`` of each batch gets one of them stamped
    (chosen at random per image, moved by up to ``jitter`` pixels each way) and keeps its true label.
    ``after_step(model)`` runs after every step."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    trig = [(torch.from_numpy(m), torch.from_numpy(p)) for m, p in (triggers or [])]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = (len(xt) + batch_size - 1) // batch_size
    model.train()
    with Progress(label, epochs * steps, enabled=progress) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(xt), generator=g)
            for i in range(0, len(xt), batch_size):
                idx = perm[i:i + batch_size]
                xb = xt[idx].clone()
                if trig and share > 0:
                    chosen = torch.nonzero(torch.rand(len(idx), generator=g) < share).flatten()
                    which = torch.randint(0, len(trig), (len(chosen),), generator=g)
                    offs = torch.randint(-jitter, jitter + 1, (len(chosen), 2), generator=g)
                    for j, t, (dy, dx) in zip(chosen.tolist(), which.tolist(), offs.tolist()):
                        m, p = trig[t]
                        if dy or dx:
                            m, p = shift(m, dy, dx), shift(p, dy, dx)
                        xb[j] = (1 - m) * xb[j] + m * p
                loss = nn.functional.cross_entropy(model(xb), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if after_step is not None:
                    after_step(model)
                bar.update(1)
    return model.eval()


class FinePruning:
    """Prune the last conv layer's least active channels within an accuracy bound, then fine-tune.

    Learned attributes: ``layer_`` (module name), ``activation_`` (mean per channel on clean data),
    ``pruned_channels_``, ``history_`` ([(channels pruned, validation accuracy)]),
    ``accuracy_before_``, ``accuracy_pruned_``, ``accuracy_after_`` (validation, in [0, 1]),
    ``model_`` (the repaired copy), ``state_dict_``, ``seconds_``.
    """

    def __init__(self, *, max_drop: float = 0.02, step: int | None = None, max_share: float = 0.9,
                 epochs: int = 1, lr: float = 1e-3, batch_size: int = 64, validation_share: float = 0.25,
                 seed: int = 0, progress: bool | None = None):
        self.max_drop = max_drop
        self.step = step
        self.max_share = max_share
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.validation_share = validation_share
        self.seed = seed
        self.progress = progress

    def fit(self, model: nn.Module, x: np.ndarray, y: np.ndarray) -> FinePruning:
        t0 = time.perf_counter()
        x_tr, y_tr, x_val, y_val = split(x, y, 1 - self.validation_share, seed=self.seed)
        repaired = copy.deepcopy(model).eval()
        name, conv = last_conv(repaired)
        norm = _following_norm(repaired, name, conv.out_channels)
        act = channel_activation(repaired, conv, x_tr)
        order = np.argsort(act, kind="stable")
        base = accuracy(repaired, x_val, y_val)
        step = self.step or max(1, conv.out_channels // 32)
        limit = int(self.max_share * conv.out_channels)
        keep = torch.ones(conv.out_channels, dtype=torch.bool)
        saved = {k: v.clone() for k, v in repaired.state_dict().items()}

        def apply(model_: nn.Module) -> None:
            with torch.no_grad():
                z = ~keep
                conv.weight[z] = 0
                if conv.bias is not None:
                    conv.bias[z] = 0
                if norm is not None:
                    norm.weight[z] = 0
                    norm.bias[z] = 0

        history = [(0, base)]
        pruned = 0
        with Progress("prune", limit, enabled=self.progress) as bar:
            while pruned + step <= limit:
                keep[torch.from_numpy(order[pruned:pruned + step].copy())] = False
                apply(repaired)
                acc = accuracy(repaired, x_val, y_val)
                if base - acc > self.max_drop:  # this step would cost too much: undo it and stop
                    keep[torch.from_numpy(order[pruned:pruned + step].copy())] = True
                    repaired.load_state_dict(saved)
                    apply(repaired)
                    break
                pruned += step
                history.append((pruned, acc))
                bar.update(step, f"acc {acc:.3f}")
        acc_pruned = accuracy(repaired, x_val, y_val)
        if self.epochs > 0:
            finetune(repaired, x_tr, y_tr, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                     seed=self.seed, after_step=apply, progress=self.progress, label="finetune")
        self.layer_ = name
        self.activation_ = act
        self.pruned_channels_ = [int(c) for c in order[:pruned]]
        self.history_ = history
        self.accuracy_before_ = base
        self.accuracy_pruned_ = acc_pruned
        self.accuracy_after_ = accuracy(repaired, x_val, y_val)
        self.model_ = repaired
        self.state_dict_ = {k: v.detach().clone() for k, v in bare(repaired).state_dict().items()}
        self.seconds_ = time.perf_counter() - t0
        return self


class Unlearning:
    """Fine-tune on clean data with ``share`` of it stamped with reversed triggers at true labels.

    ``fit(model, x, y, masks=..., patterns=...)`` takes one ``(1, H, W)`` mask and ``(C, H, W)``
    pattern per suspect label. Learned attributes: ``accuracy_before_``, ``accuracy_after_``
    (validation), ``model_``, ``state_dict_``, ``seconds_``.
    """

    def __init__(self, *, share: float = 0.2, epochs: int = 10, lr: float = 1e-3, jitter: int = 2,
                 batch_size: int = 64, validation_share: float = 0.25, seed: int = 0,
                 progress: bool | None = None):
        self.share = share
        self.jitter = jitter
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.validation_share = validation_share
        self.seed = seed
        self.progress = progress

    def fit(self, model: nn.Module, x: np.ndarray, y: np.ndarray, *, masks: np.ndarray,
            patterns: np.ndarray) -> Unlearning:
        t0 = time.perf_counter()
        if len(masks) == 0:
            raise InputError("unlearning needs at least one reversed trigger (no suspect label in the profile)")
        if not 0 < self.share < 1:
            raise InputError(f"the stamped share must be in (0, 1), got {self.share}")
        x_tr, y_tr, x_val, y_val = split(x, y, 1 - self.validation_share, seed=self.seed)
        repaired = copy.deepcopy(model).eval()
        self.accuracy_before_ = accuracy(repaired, x_val, y_val)
        triggers = [(np.asarray(m, np.float32), np.asarray(p, np.float32)) for m, p in zip(masks, patterns)]
        finetune(repaired, x_tr, y_tr, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                 seed=self.seed, triggers=triggers, share=self.share, jitter=self.jitter, progress=self.progress,
                 label="unlearn")
        self.accuracy_after_ = accuracy(repaired, x_val, y_val)
        self.model_ = repaired
        self.state_dict_ = {k: v.detach().clone() for k, v in bare(repaired).state_dict().items()}
        self.seconds_ = time.perf_counter() - t0
        return self


def profile_triggers(profile, labels: list[int] | None = None) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The reversed triggers of the profile's suspect labels: ``(labels, masks, patterns)``.

    Reads ``all_masks``/``all_patterns`` (indexed by label) when the profile has them, else
    ``masks``/``patterns`` (one row per suspect label, in the order of ``suspect_labels``).
    """
    labels = list(profile.suspect_labels if labels is None else labels)
    t = profile.tensors
    if not labels:
        return [], np.zeros((0,)), np.zeros((0,))
    if "all_masks" in t and "all_patterns" in t:
        k = len(t["all_masks"])
        bad = [s for s in labels if not 0 <= s < k]
        if bad:
            raise InputError(f"suspect label(s) {bad} are outside the profile's {k} reversed triggers")
        return labels, t["all_masks"][labels], t["all_patterns"][labels]
    if "masks" in t and "patterns" in t and len(t["masks"]) == len(profile.suspect_labels):
        rows = [profile.suspect_labels.index(s) for s in labels]
        return labels, t["masks"][rows], t["patterns"][rows]
    raise InputError("the profile holds no reversed triggers (all_masks/all_patterns); rescan with guard scan")
