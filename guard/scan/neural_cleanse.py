"""Neural Cleanse (Wang et al., S&P 2019), with every label's trigger optimised in one batched problem.

For each label k it finds the smallest mask m_k and pattern p_k (raw pixel space, tanh box
constraint) such that ``(1 - m_k) x + m_k p_k`` is classified k; a backdoor target needs a far smaller
mask than the natural labels, which the MAD anomaly index exposes. The published cost schedule is kept
(Adam lr 0.1, betas (0.5, 0.9), batch 32, cost 1e-3 set once the attack first succeeds, x1.5 after
``patience`` rounds at >= 99% success, / 1.5**1.5 after ``patience`` rounds below), but each label
keeps its own cost and counters as rows of one tensor, so a 10-label scan is one optimisation, not ten.
A label stops once its mask has converged: ``early_stop_patience`` rounds in a row in which its best
L1 norm improved by less than ``1 - early_stop_threshold`` (by default: not at all; the reference
code uses 0.99, a 1% improvement).

With ``lr=0.2, batch_size=16, max_rounds=100`` (fewer, larger steps) a scan of the ResNet-18 layout
needed far fewer image passes and still found the target's small mask; the defaults stay the published
ones until that setting is checked on every test model (figures: docs/benchmarks.md, 'Measurements
behind the defaults').

What a step costs: one forward and backward over (labels x ``batch_size``) stamped images. With
``channels_last=True`` a convolutional net runs them channels-last (the model is converted for the
fit and back), which made a step cheaper on the CPUs it was tried on (figures: docs/benchmarks.md,
'Measurements behind the defaults'); off by default, since the changed summation order moves the
optimisation's path and the detection floors were measured without it.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from guard._progress import Progress
from guard.errors import InputError
from guard.model import FeatureTap, frozen
from guard.model import num_classes as count_classes
from guard.scan.trigger import from_raw, stamp_all, to_raw
from guard.stats import anomaly_index, family_threshold, log_anomaly_index

SCREEN_ABOVE = 25
"""Label counts above which a scan screens labels first. The full stage then optimises 5 candidates and
10 references, and the screening stage costs about a fifth of a full label per label, so below about
20-25 labels the two stages together cost as much as optimising every label in full."""


def validate_max_rounds(max_rounds: int | None) -> None:
    """InputError for a Neural Cleanse budget (``--max-rounds``) under one round; None is the default budget."""
    if max_rounds is not None and max_rounds < 1:
        raise InputError(f"--max-rounds must be >= 1, got {max_rounds}")


class NeuralCleanse:
    """Reverse-engineer a trigger for every label and flag the anomalously small ones.

    A label is flagged when it passes the paper's MAD test (anomaly index above ``threshold``, on the
    raw or the log-scale norms, below the median) *and* its trigger costs at most ``isolation`` times
    the cheapest natural label's (a label the MAD test leaves alone). Among ten labels the MAD of nine
    others is a noisy scale: the largest index of ten natural labels often passes 2 (simulated under a
    normal null), and the MAD test alone flagged several of the seeded clean glyph models. A backdoor's
    trigger stands apart from every natural label instead: on that calibration population
    (tests/scan/nc_calibration.py) a clean model's cheapest label cost not much less than its
    cheapest natural one and a patch target a fraction of it, and the default ``isolation`` lies
    between the two (figures: docs/benchmarks.md, 'Measurements behind the defaults').
    ``isolation=1.0`` gives the published rule alone. A screened scan (below) applies it too, and needs it
    more: its candidates are the cheapest natural labels of many, which the MAD test alone flags.

    With many labels (more than ``screen_above``) the cost of optimising every label's trigger grows
    with the label count, so the scan runs in two stages, as scanners after Neural Cleanse do (K-Arm,
    ICML 2021; TrojAI's label pre-selection). The screening stage gives every label a short targeted
    optimisation (``screen_steps`` steps on ``screen_batch`` images per label) under a fixed, heavy L1
    cost, from a faint mask over the whole image (``screen_mask_start``): a backdoor target's pattern
    takes its images to the target within a few steps and then sheds the mask down to a few pixels, a
    natural label cannot, so the labels with the lowest loss at the end of the steps (the mean over the
    last ``screen_tail``) are the ``candidates``. Where the optimisation ends separates a target better
    than how fast it gets there (the area under the whole loss curve): on a 100-class composed-glyph world
    the area ranked the target 16th and the end first, and the end's margin over the next label grew with
    the steps (figures: docs/benchmarks.md, 'Measurements behind the defaults').
    The starting mask 0.1 is the one that ranked the target among the candidates on the composed-glyph
    worlds at both 100 and 1000 labels: fainter masks have to grow before any label is reached, and
    0.2 lost the 1000-class target; the margin at 1000 labels is small (figures: docs/benchmarks.md,
    'Measurements behind the defaults'). The full optimisation then
    runs on the candidates and on ``references`` labels drawn at random from the rest, which give the
    MAD test a representative median and spread. The candidates are by construction the cheapest of
    all labels, so the MAD test's bar ``threshold_`` is raised for the number of labels they were
    picked from (:func:`guard.stats.family_threshold`: the chance that a natural label passes stays
    what the published 2.0 gives among 10 labels; 2.84 at 100 labels, 3.51 at 1000). The index alone does
    not hold many labels: on the composed-glyph 100-label worlds over ten seeds two clean twins had a
    natural label over the bar (2.87, 3.93), and at 1000 labels a target's index was as low as 4.1, so no
    one bar on it holds both. The isolation bar does: the natural labels over the raised bar cost 0.77-0.89
    of the next natural label, the targets 0.18-0.34, at 100 and at 1000 labels; right on both sides on 10
    of 10 seeds at 100 labels and 4 of 5 at 1000, where the screening missed one target (figures:
    docs/benchmarks.md, 'Other networks and class counts'). ``screened_`` records what the first stage
    chose.

    Learned attributes: ``masks_`` (K, 1, H, W), ``patterns_`` (K, C, H, W), ``l1_norms_``,
    ``attack_success_``, ``anomaly_index_``, ``log_anomaly_index_``, ``isolation_``, ``threshold_`` (the bar the
    indices were held to), ``suspect_labels_``, ``steps_``, ``seconds_``.

    ``device`` runs the optimisation there (``"cuda"`` on a GPU machine: the batched problem is one
    large forward/backward per step, which is where batching the labels pays); the model is moved there
    for the fit and back afterwards, and the random draws stay on the CPU generator, so a seed gives
    the same initial triggers and batches on every device.

    Parameters
    ----------
    lr
        Adam's learning rate on the raw (tanh) masks and patterns; the published 0.1 (betas (0.5, 0.9)).
        Fewer, larger steps (``lr=0.2, batch_size=16, max_rounds=100``) have not been checked on every
        test model (docs/benchmarks.md, 'Measurements behind the defaults').
    batch_size
        Clean images each label's trigger is stamped on per step; a step forwards labels x
        ``batch_size`` images. The published 32.
    init_cost
        L1 weight of the mask, set once a label's attack has succeeded ``patience`` rounds in a row (0
        until then, so the trigger first learns to work); the published 1e-3.
    attack_succ_threshold
        Share of a round's stamped images that must reach the label for the round to count as a success
        (and for its trigger to be kept as the label's best); the published 0.99.
    patience
        Rounds in a row on one side of ``attack_succ_threshold`` before the cost is set (succeeding
        rounds), raised (succeeding) or lowered (failing); the published 5.
    early_stop_patience
        A label stops after this many stalled rounds in a row (its best L1 norm no better than
        ``early_stop_threshold`` times the round before's); 25, five times ``patience``. Re-reversals
        during purification use 10.
    early_stop_threshold
        Ratio of a round's best L1 norm to the previous round's at or above which the round counts as
        stalled. 1.0: stalled unless it improved at all; 0.99 would count an improvement under 1% as
        stalled, as the reference code does.
    steps_per_round
        Adam steps per round: a round is the unit the cost schedule, early stopping and ``max_rounds``
        count in, and its attack success and L1 norm are averaged over its steps. 2 lets the schedule
        react every couple of steps.
    max_rounds
        Rounds at most (``max_rounds * steps_per_round`` steps per label); a label that converges stops
        sooner. 200; purification's re-reversals, which start from a known suspect, use 60.
    cost_multiplier
        Factor the cost is raised by after ``patience`` succeeding rounds; after ``patience`` failing
        rounds it is divided by ``cost_multiplier ** 1.5``. The published 1.5.
    threshold
        Bar on the MAD anomaly index (raw or log-scale norms, below the median); the published 2.0. A
        screened scan raises it for the number of labels it screened (``threshold_``).
    isolation
        A flagged label's L1 norm may be at most this times the cheapest natural label's (1.0 gives the
        published rule alone). 0.6 lies between clean and patch-backdoored
        models on the calibration population (docs/benchmarks.md, 'Measurements behind the defaults').
    labels
        Optimise only these labels (no screening); None: every label, or the screened ones. Purification
        re-reverses the suspect labels this way.
    seed
        Seeds every draw: each label's initial trigger (from ``(seed, label)``, so it is the same alone
        or batched), the batches and the screening's references.
    progress
        Progress bar on stderr; None: when stderr is a terminal (or ``GUARD_PROGRESS=1``).
    device
        Where the optimisation runs (``"cpu"``, ``"cuda[:N]"``); the model is moved there and back.
    screen_above
        Label counts above which the scan screens labels first; None never screens, 0 always.
        :data:`SCREEN_ABOVE` (25): below it the two stages cost as much as optimising every label.
    candidates
        Labels with the lowest screening scores that the full optimisation runs on; 5.
    references
        Labels drawn at random from the rest that run in full beside the candidates, so that the MAD
        test has a representative median and spread; 10.
    screen_steps
        Adam steps each label gets in the screening; 60 (a label's screening then costs about a fifth of
        its full optimisation).
    screen_tail
        The screening score is a label's mean loss over its last ``screen_tail`` steps: where it ends
        under the fixed L1 cost; 10.
    screen_batch
        Images per label per screening step; 4, which keeps the screening's cost per label small.
    screen_cost
        The screening's fixed L1 weight (no schedule), 1e-3 (the full optimisation's ``init_cost``)
        from the first step: a label's score charges for the mask it needs as well as the cross-entropy.
    screen_chunk
        Labels per batched screening problem (``screen_chunk * screen_batch`` images per step), which
        bounds its memory; 128.
    screen_mask_start
        Value of the faint whole-image mask every screened label starts from; 0.1 ranked the target among
        the candidates at both 100 and 1000 labels (docs/benchmarks.md, 'Measurements behind the
        defaults').
    channels_last
        Run a convolutional net channels-last during the fit (cheaper steps on the CPUs tried); off by
        default because the changed summation order moves the optimisation's path and the detection
        floors were measured without it.

    >>> import numpy as np, torch
    >>> from guard import NeuralCleanse
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4)).eval()
    >>> x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    >>> nc = NeuralCleanse(max_rounds=3, seed=0, progress=False).fit(net, x)
    >>> nc.masks_.shape, nc.patterns_.shape, len(nc.anomaly_index_)
    ((4, 1, 8, 8), (4, 1, 8, 8), 4)
    >>> isinstance(nc.suspect_labels_, list)
    True
    """

    def __init__(self, *, lr: float = 0.1, batch_size: int = 32, init_cost: float = 1e-3,
                 attack_succ_threshold: float = 0.99, patience: int = 5, early_stop_patience: int = 25,
                 early_stop_threshold: float = 1.0,
                 steps_per_round: int = 2, max_rounds: int = 200, cost_multiplier: float = 1.5,
                 threshold: float = 2.0, isolation: float = 0.6, labels: list[int] | None = None, seed: int = 0,
                 progress: bool | None = None, device: str = "cpu", screen_above: int | None = SCREEN_ABOVE,
                 candidates: int = 5, references: int = 10, screen_steps: int = 60, screen_tail: int = 10,
                 screen_batch: int = 4, screen_cost: float = 1e-3, screen_chunk: int = 128,
                 screen_mask_start: float = 0.1, channels_last: bool = False):
        self.lr = lr
        self.batch_size = batch_size
        self.init_cost = init_cost
        self.attack_succ_threshold = attack_succ_threshold
        self.patience = patience
        self.early_stop_patience = early_stop_patience
        self.early_stop_threshold = early_stop_threshold
        self.steps_per_round = steps_per_round
        self.max_rounds = max_rounds
        self.cost_multiplier = cost_multiplier
        self.threshold = threshold
        self.isolation = isolation
        self.labels = labels
        self.seed = seed
        self.progress = progress
        self.device = device
        self.screen_above = screen_above
        self.candidates = candidates
        self.references = references
        self.screen_steps = screen_steps
        self.screen_tail = screen_tail
        self.screen_batch = screen_batch
        self.screen_cost = screen_cost
        self.screen_chunk = screen_chunk
        self.screen_mask_start = screen_mask_start
        self.channels_last = channels_last

    def fit(self, model: nn.Module, x: np.ndarray, num_classes: int | None = None) -> NeuralCleanse:
        """Optimise all labels' triggers on clean images ``x`` (N, C, H, W) in [0, 1]."""
        dev = torch.device(self.device)
        home = next(iter(model.parameters()), torch.empty(0)).device
        model.to(dev)
        convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
        self._channels_last = self.channels_last and x.ndim == 4 and bool(convs) and convs[0].is_contiguous()
        if self._channels_last:
            model.to(memory_format=torch.channels_last)
        try:
            return self._fit(model, x, num_classes, dev)
        finally:
            if self._channels_last:
                model.to(memory_format=torch.contiguous_format)
            model.to(home)

    def _forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return model(x)

    def _fit(self, model: nn.Module, x: np.ndarray, num_classes: int | None, dev: torch.device) -> NeuralCleanse:
        t0 = time.perf_counter()
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev)
        gen = torch.Generator().manual_seed(self.seed)
        k_all = num_classes or count_classes(model, xt)
        self.num_classes_ = k_all
        self.screened_ = None
        if self.labels is not None:
            labels = list(self.labels)
        elif self.screen_above is not None and k_all > self.screen_above:
            labels = self._screen(model, xt, k_all, dev)
        else:
            labels = list(range(k_all))
        k = len(labels)
        _, c, h, w = xt.shape
        target = torch.tensor(labels, device=dev).repeat_interleave(self.batch_size)
        # each label's initial trigger comes from its own generator (seed, label): a label starts from the
        # same trigger whether it is optimised alone or with the others, so the batched problem and a
        # per-label loop follow the same path (batches come from the shared generator in both)
        inits = [torch.Generator().manual_seed(self.seed * 1_000_003 + int(lab)) for lab in labels]
        mask_raw = to_raw(torch.cat([torch.rand((1, 1, h, w), generator=g) for g in inits]))
        pattern_raw = to_raw(torch.cat([torch.rand((1, c, h, w), generator=g) for g in inits]))
        mask_raw = mask_raw.to(dev).requires_grad_(True)
        pattern_raw = pattern_raw.to(dev).requires_grad_(True)
        opt = torch.optim.Adam([mask_raw, pattern_raw], lr=self.lr, betas=(0.5, 0.9))

        cost = torch.zeros(k, dtype=torch.float64, device=dev)
        cost_set = torch.zeros(k, dtype=torch.long, device=dev)
        up = torch.zeros(k, dtype=torch.long, device=dev)
        down = torch.zeros(k, dtype=torch.long, device=dev)
        best_l1 = torch.full((k,), math.inf, dtype=torch.float64, device=dev)
        best_mask = torch.zeros((k, 1, h, w), device=dev)
        best_pattern = torch.zeros((k, c, h, w), device=dev)
        best_acc = torch.zeros(k, dtype=torch.float64, device=dev)
        since_best = torch.zeros(k, dtype=torch.long, device=dev)
        done = torch.zeros(k, dtype=torch.bool, device=dev)
        prev_best = best_l1.clone()
        rounds = 0
        with frozen(model), Progress("nc", self.max_rounds, enabled=self.progress) as bar:
            for rounds in range(1, self.max_rounds + 1):  # noqa: B007 - read after the loop
                acc_sum = torch.zeros(k, dtype=torch.float64, device=dev)
                l1_sum = torch.zeros(k, dtype=torch.float64, device=dev)
                # finished labels leave the forward pass (their best trigger is kept): the batch
                # shrinks as labels converge, and an active label's trajectory does not change
                act = torch.nonzero(~done).flatten()
                n_act = len(act)
                tgt = target.view(k, -1)[act].reshape(-1)
                for _ in range(self.steps_per_round):
                    idx = torch.randint(0, len(xt), (self.batch_size,), generator=gen).to(dev)
                    masks, patterns = from_raw(mask_raw[act]), from_raw(pattern_raw[act])
                    logits = self._forward(model, stamp_all(xt[idx], masks, patterns))
                    ce = nn.functional.cross_entropy(logits, tgt, reduction="none").view(n_act, -1).mean(1)
                    l1 = masks.sum(dim=(1, 2, 3))
                    loss = (ce + cost[act].to(ce.dtype) * l1).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        acc_sum[act] += (logits.argmax(1) == tgt).view(n_act, -1).double().mean(1)
                        l1_sum[act] += l1.double()
                acc = acc_sum / self.steps_per_round
                l1_avg = l1_sum / self.steps_per_round
                ok = acc >= self.attack_succ_threshold
                with torch.no_grad():
                    improved = ok & (l1_avg < best_l1) & ~done
                    if improved.any():
                        masks, patterns = from_raw(mask_raw), from_raw(pattern_raw)
                        best_mask[improved] = masks[improved]
                        best_pattern[improved] = patterns[improved]
                        best_l1[improved] = l1_avg[improved]
                        best_acc[improved] = acc[improved]
                # early stopping: a label is done after early_stop_patience rounds in a row in which its
                # best norm improved by less than 1 - early_stop_threshold
                has_best = torch.isfinite(best_l1)
                stalled = has_best & (best_l1 >= self.early_stop_threshold * prev_best)
                since_best = torch.where(stalled, since_best + 1, torch.zeros_like(since_best))
                prev_best = best_l1.clone()
                done |= has_best & (since_best >= self.early_stop_patience)
                # the published cost schedule, per label
                unset = cost == 0
                cost_set = torch.where(unset & ok, cost_set + 1, torch.where(unset, 0, cost_set))
                newly = unset & (cost_set >= self.patience)
                cost = torch.where(newly, torch.full_like(cost, self.init_cost), cost)
                active = ~unset
                up = torch.where(active & ok, up + 1, torch.zeros_like(up))
                down = torch.where(active & ~ok, down + 1, torch.zeros_like(down))
                raise_ = up >= self.patience
                lower = down >= self.patience
                cost = torch.where(raise_, cost * self.cost_multiplier, cost)
                cost = torch.where(lower, cost / self.cost_multiplier ** 1.5, cost)
                up = torch.where(raise_, torch.zeros_like(up), up)
                down = torch.where(lower, torch.zeros_like(down), down)
                bar.update(1, f"done {int(done.sum())}/{k}")
                if bool(done.all()):
                    break
        # a label whose attack never succeeded keeps its last trigger, flagged by its success rate
        never = ~torch.isfinite(best_l1)
        if never.any():
            with torch.no_grad():
                best_mask[never] = from_raw(mask_raw)[never]
                best_pattern[never] = from_raw(pattern_raw)[never]
                best_l1[never] = best_mask[never].sum(dim=(1, 2, 3)).double()
        self.labels_ = labels
        self.masks_ = best_mask.cpu().numpy()
        self.patterns_ = best_pattern.cpu().numpy()
        self.l1_norms_ = best_l1.cpu().numpy()
        self.attack_success_ = best_acc.cpu().numpy()
        self.converged_ = (~never).cpu().numpy()
        # screened: the candidates are the cheapest of all k_all labels, so the bar is raised for the
        # number of labels they were picked from (stats.family_threshold); unscreened, the published 2.0
        self.threshold_ = float(self.threshold)
        if self.screened_ is not None:
            self.threshold_ = family_threshold(self.threshold, k_all)
        self.anomaly_index_ = anomaly_index(self.l1_norms_)
        self.log_anomaly_index_ = log_anomaly_index(self.l1_norms_)
        self.suspect_labels_ = self._flag()
        self.steps_ = rounds * self.steps_per_round
        self.seconds_ = time.perf_counter() - t0
        return self

    def _screen(self, model: nn.Module, xt: torch.Tensor, num_classes: int, dev: torch.device) -> list[int]:
        """The labels the full optimisation runs on: the candidates of a cheap all-label stage, plus references.

        Every label gets ``screen_steps`` Adam steps on ``screen_batch`` images under the fixed L1 cost
        ``screen_cost`` (labels in chunks of ``screen_chunk`` to bound memory); its score is the mean loss
        (cross-entropy to the label plus the cost times the mask's L1 norm) over its last ``screen_tail``
        steps: where the label ends. Every chunk sees the same images at the same step, so that scores
        compare across chunks (with a batch drawn per chunk, the candidates clustered in the chunk that drew
        easy images, and a 1000-class target was screened out). Seeded: the initial triggers and batches come
        from the CPU generator.
        """
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919)
        _, c, h, w = xt.shape
        score = np.empty(num_classes)
        batches: list[torch.Tensor] = []  # each step's images, drawn with the first chunk
        tail = max(1, min(self.screen_tail, self.screen_steps))  # where a label ends
        with frozen(model):
            for lo in range(0, num_classes, self.screen_chunk):
                chunk = torch.arange(lo, min(num_classes, lo + self.screen_chunk), device=dev)
                k = len(chunk)
                # masks start faint over the whole image: a backdoor's pattern reaches its target at once
                mask_raw = to_raw(torch.full((k, 1, h, w), self.screen_mask_start)).to(dev).requires_grad_(True)
                pattern_raw = to_raw(torch.rand((k, c, h, w), generator=gen)).to(dev).requires_grad_(True)
                opt = torch.optim.Adam([mask_raw, pattern_raw], lr=self.lr, betas=(0.5, 0.9))
                target = chunk.repeat_interleave(self.screen_batch)
                acc = torch.zeros(k, dtype=torch.float64, device=dev)
                if not batches:
                    batches = [torch.randint(0, len(xt), (self.screen_batch,), generator=gen).to(dev)
                               for _ in range(self.screen_steps)]
                for step in range(self.screen_steps):
                    idx = batches[step]
                    masks, patterns = from_raw(mask_raw), from_raw(pattern_raw)
                    logits = self._forward(model, stamp_all(xt[idx], masks, patterns))
                    ce = nn.functional.cross_entropy(logits, target, reduction="none").view(k, -1).mean(1)
                    loss = ce + self.screen_cost * masks.sum(dim=(1, 2, 3))
                    opt.zero_grad(set_to_none=True)
                    loss.sum().backward()
                    opt.step()
                    if step >= self.screen_steps - tail:
                        acc += loss.detach().double()
                score[lo:lo + k] = (acc / tail).cpu().numpy()
        order = np.argsort(score, kind="stable")
        candidates = [int(v) for v in order[:self.candidates]]
        rest = np.setdiff1d(np.arange(num_classes), candidates)
        rng = np.random.default_rng(self.seed)
        references = sorted(int(v) for v in rng.choice(rest, min(self.references, len(rest)), replace=False))
        self.screened_ = {"candidates": candidates, "references": references,
                          "scores": {str(int(v)): round(float(score[v]), 4) for v in order[:20]},
                          "median_score": round(float(np.median(score)), 4)}
        return sorted(set(candidates) | set(references))

    def _outliers(self) -> np.ndarray:
        """The MAD test alone: converged labels below the median L1 norm whose anomaly index (raw or
        log-scale) exceeds ``threshold_``."""
        below = self.l1_norms_ < np.median(self.l1_norms_)
        hot = (self.anomaly_index_ > self.threshold_) | (self.log_anomaly_index_ > self.threshold_)
        return below & hot & self.converged_

    def _isolation(self, natural: np.ndarray) -> np.ndarray:
        """Each label's L1 norm over the cheapest norm among the *other* ``natural`` labels (those the
        MAD test leaves alone; ``inf`` when there is none): how far a trigger stands apart from them."""
        l1 = np.asarray(self.l1_norms_, dtype=np.float64)
        out = np.full(len(l1), np.inf)
        for i in range(len(l1)):
            others = l1[natural & (np.arange(len(l1)) != i)]
            if others.size:
                out[i] = l1[i] / max(float(others.min()), 1e-12)
        return out

    def _flag(self) -> list[int]:
        """Labels that pass the MAD test and whose trigger costs at most ``isolation`` times the cheapest
        natural label's (see the class docstring for why both); sets ``isolation_``."""
        hot = self._outliers()
        self.isolation_ = self._isolation(~hot)
        return [int(self.labels_[i]) for i in np.flatnonzero(hot & (self.isolation_ <= self.isolation))]

    def per_label(self) -> list[dict]:
        """One JSON-ready record per label."""
        return [{"label": int(lab), "l1_norm": float(self.l1_norms_[i]),
                 "anomaly_index": float(self.anomaly_index_[i]),
                 "log_anomaly_index": float(self.log_anomaly_index_[i]),
                 "isolation": float(self.isolation_[i]) if np.isfinite(self.isolation_[i]) else None,
                 "attack_success": float(self.attack_success_[i]),
                 "converged": bool(self.converged_[i]),
                 "suspect": int(lab) in self.suspect_labels_} for i, lab in enumerate(self.labels_)]


def suspect_neurons(model: nn.Module, x: np.ndarray, mask: np.ndarray, pattern: np.ndarray, *,
                    share: float = 0.01, minimum: int = 3, layer: str | None = None) -> np.ndarray:
    """Indices of the feature-layer neurons most raised by the reversed trigger (top ``share``)."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    m, p = torch.from_numpy(mask), torch.from_numpy(pattern)
    with frozen(model), torch.no_grad(), FeatureTap(model, layer) as tap:
        model(xt)
        clean = tap.features.mean(0)
        model((1 - m) * xt + m * p)
        stamped = tap.features.mean(0)
    n = max(minimum, int(math.ceil(share * clean.numel())))
    return torch.argsort(stamped - clean, descending=True)[:n].numpy()
