"""Guard: the production model wrapped with its profile; one forward pass per batch, then verdicts."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from guard.errors import ModelError, ProfileError
from guard.inputs import validate_batch
from guard.model import FeatureTap, feature_layer, fingerprint
from guard.model.tokens import TokenStatistics
from guard.online import repair, scoring
from guard.online.checks import CHECKS, Check, Record, pool
from guard.online.ensemble import RULES, FisherEnsemble, UnionRule
from guard.online.memory import TriggerMemory
from guard.online.policy import Decision, validate_mode
from guard.online.trajectory import Trajectory
from guard.profile import Profile
from guard.stats import softmax

_VERDICT_NAMES = np.array(["pass", "rejected", "repaired", "flagged"], dtype=object)
_SUSPECT_CODE = {"enforce": 1, "repair": 2, "shadow": 3}
REPEATED_TRIGGER = "repeated_trigger"
"""The reason (and score column) of the trigger memory's similarity (:mod:`guard.online.memory`)."""
RESIDUAL_NOISE = "residual_noise"
"""The reason (and score column) of the trigger memory's energy: a watched query's high-frequency residual
stronger than clean images' (noise drowning a repeated trigger)."""
TRAJECTORY = "trajectory"
"""The reason (and score column) of the trajectory check (:mod:`guard.online.trajectory`): an input that does
not sit among clean images of its predicted class layer by layer."""


@dataclass
class GuardResult:
    """A batch's outcome as arrays; :attr:`decisions` builds the per-input objects on demand.

    ``verdict_codes`` index ``pass, rejected, repaired, flagged``; ``scores`` is ``(N, n_checks)`` in
    ``names`` order, ``thresholds`` the checks' own thresholds, ``statistic`` the ensemble's combined
    score (suspect when over ``ensemble_threshold``) and ``over`` marks, on suspect inputs, the checks
    that give the reasons: those over their own threshold, else the one contributing most.
    ``strength`` orders them (each check's contribution to the statistic, strongest first). For
    repaired inputs ``logits`` are the repaired image's and ``repaired_scores`` its re-scored checks.
    ``stages_ms`` splits the call into ``validate``, ``forward`` (the model's tapped forward pass),
    ``scoring`` (the checks and the ensemble) and ``policy`` (verdicts, reasons, repair and the trigger
    memory); ``forward_ms`` is its forward stage and ``guard_ms`` the rest, the guard's own time. All three
    read ``marks``, ``Guard.run``'s clock readings (0 and None for a result built without them).
    """

    names: list[str]
    logits: np.ndarray
    scores: np.ndarray
    thresholds: np.ndarray
    over: np.ndarray
    verdict_codes: np.ndarray
    repaired_scores: dict[int, np.ndarray]
    statistic: np.ndarray
    ensemble_threshold: float
    strength: np.ndarray
    marks: tuple[float, ...] = ()
    """``Guard.run``'s clock readings (start, validated, forward done, scored, end): :attr:`stages_ms` reads them."""

    @property
    def stages_ms(self) -> dict[str, float] | None:
        if len(self.marks) != 5:
            return None
        t0, t1, t2, ts, t3 = self.marks
        return {"validate": (t1 - t0) * 1e3, "forward": (t2 - t1) * 1e3, "scoring": (ts - t2) * 1e3,
                "policy": (t3 - ts) * 1e3}

    @property
    def forward_ms(self) -> float:
        return (self.marks[2] - self.marks[1]) * 1e3 if len(self.marks) == 5 else 0.0

    @property
    def guard_ms(self) -> float:  # read on every served request (the latency metric): no stages dict
        if len(self.marks) != 5:
            return 0.0
        t0, t1, t2, _, t3 = self.marks
        return ((t1 - t0) + (t3 - t2)) * 1e3

    @property
    def verdicts(self) -> list[str]:
        return _VERDICT_NAMES[self.verdict_codes].tolist()

    @property
    def decisions(self) -> list[Decision]:
        probs = np.round(softmax(self.logits).astype(np.float64), 6).tolist()
        labels = self.logits.argmax(1).tolist()
        scores = np.round(self.scores.astype(np.float64), 4).tolist()
        stats = np.round(np.asarray(self.statistic, dtype=np.float64), 4).tolist()
        fired_any = self.over.any(1).tolist()
        names = self.names
        out = []
        for i, verdict in enumerate(self.verdicts):
            reasons: list[str] = []
            if fired_any[i]:
                fired = np.flatnonzero(self.over[i])
                reasons = [names[j] for j in fired[np.argsort(-self.strength[i, fired], kind="stable")]]
            sc = dict(zip(names, scores[i]))
            sc["ensemble"] = stats[i]
            if i in self.repaired_scores:
                sc.update(zip([f"{n}_repaired" for n in names],
                              np.round(np.asarray(self.repaired_scores[i], dtype=np.float64), 4).tolist()))
            if verdict == "rejected":
                out.append(Decision(None, None, verdict, reasons, sc))
            else:
                out.append(Decision(labels[i], probs[i], verdict, reasons, sc))
        return out


def _pin_numpy_blas() -> None:
    """Run numpy's BLAS single-threaded (process-wide).

    The checks multiply matrices of a few hundred elements; BLAS worker threads buy nothing there
    and, spinning against torch's own threads, made batch-32 scoring slower than the forward pass
    itself (figures: docs/benchmarks.md, 'Measurements behind the defaults'). torch's thread pool is
    untouched.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


class Guard:
    """Wrap ``model`` with ``profile`` and decide pass | repaired | rejected | flagged per input.

    ``memory`` (``None``, the default, takes it from the profile, where ``guard scan`` calibrates one watching the
    scan's suspect labels, or every label where it suspects none; ``False`` turns it off; or a calibrated
    :class:`~guard.online.memory.TriggerMemory`) adds the stateful check: an input the model assigns to a
    watched label whose trigger-like residual matches a recent query's is rejected (flagged in shadow mode,
    never repaired) with the reason ``repeated_trigger``, and one whose high-frequency residual is stronger
    than clean images' (noise drowning a trigger) with the reason ``residual_noise``; their scores are the
    last two columns of a result's ``scores``. It costs about 0.1 ms per input on a 2-core CPU
    (docs/benchmarks.md, 'Adaptive attackers') and holds the last queries' residuals in memory.
    ``trajectory`` (``None`` takes the profile's, which ``guard scan --trajectory`` adds; ``False`` turns it off;
    or a calibrated :class:`~guard.online.trajectory.Trajectory`) adds the trajectory check in the same forward
    pass: an input that does not sit among clean references of its predicted class layer by layer is rejected
    (flagged in shadow mode, never repaired) with the reason ``trajectory``, its score the column after the
    checks' (before the memory's). It hooks every traced layer and searches the references at each, which
    costs more than the forward pass itself on the ResNet-18 layout (docs/benchmarks.md).
    ``mode`` overrides the profile's policy: ``enforce`` rejects suspect inputs, ``repair`` paints the located
    trigger over and re-classifies (rejecting what stays suspect), ``shadow`` answers as the model did and flags. An
    input is suspect when the checks' calibrated ensemble (:mod:`guard.online.ensemble`) is over its threshold. The
    model's fingerprint must match the profile's unless ``verify=False`` (the caller already checked it).
    ``single_thread_blas`` pins numpy's BLAS to one thread for the process (see :func:`_pin_numpy_blas`).

    >>> import numpy as np, torch
    >>> from guard.scan import build_profile
    >>> from guard.scan.neural_cleanse import NeuralCleanse
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> x = np.random.default_rng(0).random((120, 1, 8, 8), dtype=np.float32)
    >>> y = net(torch.from_numpy(x)).argmax(1).numpy()
    >>> profile, _ = build_profile(net, x, y, consistency=False, progress=False,
    ...                            nc=NeuralCleanse(max_rounds=2, progress=False))
    >>> guard = Guard(net, profile, mode="shadow")
    >>> [d.verdict in ("pass", "flagged") for d in guard.predict(x[:2])]
    [True, True]
    >>> result = guard.run(x[:1])
    >>> guard.names[0], result.verdicts[0] in ("pass", "flagged")
    ('feature', True)
    >>> result.names[len(guard.names):]  # the trigger memory's two columns follow the checks'
    ['repeated_trigger', 'residual_noise']
    >>> [d.verdict for d in guard.unguarded(x[:2])]  # the bare model's answers, for fail-open serving
    ['error', 'error']
    """

    def __init__(self, model: nn.Module, profile: Profile, *, mode: str | None = None, verify: bool = True,
                 single_thread_blas: bool = True, memory: TriggerMemory | bool | None = None,
                 trajectory: Trajectory | bool | None = None):
        if verify and fingerprint(model) != profile.model_sha256:
            from guard.errors import ProfileMismatch

            raise ProfileMismatch("the profile was built for another model (SHA-256 differs): rescan it")
        self.model = model.eval()
        if single_thread_blas:
            _pin_numpy_blas()
        self.profile = profile
        self.mode = validate_mode(mode or profile.policy.mode)
        self.input_shape = profile.input_shape
        self.layer = profile.feature_layer
        self._layer_module = feature_layer(model, self.layer)[1]
        self.inner = profile.inner_layer
        modules = dict(model.named_modules())
        if self.inner is not None and self.inner not in modules:
            raise ModelError(f"the profile's inner layer {self.inner!r} is not a module of the model")
        self._inner_module = modules[self.inner] if self.inner else None
        self._tokens = _tokens_of(profile, modules)
        self.checks: list[Check] = [self._restore(name, CHECKS.get(name), *profile.check_state(name))
                                    for name in profile.checks]
        if not self.checks:
            raise ModelError("the profile has no calibrated checks")
        self.thresholds = np.asarray([c.threshold_ for c in self.checks])
        self.names = [c.name for c in self.checks]
        self.ensemble = self._decision_rule()
        self.fill = profile.tensors["fill"].astype(np.float32)
        self.repair_pixels = int(profile.repair.pixels)
        neuron = next((c for c in self.checks if c.name == "neuron"), None)
        self._neuron = (neuron.weights_, neuron.bias_) if neuron is not None else (None, None)
        self._masks = profile.tensors.get("masks")
        self._kernels, self._params = scoring.pack(self.checks)
        self._rule = (type(self.ensemble).kernel, self.ensemble.params())
        self._one = scoring.scorer(self._kernels, self._rule[0], raw_inner=True)
        self._no_inner = np.zeros((1, 1, 1, 1), np.float32)
        self._tap: FeatureTap | None = None  # held open by session()
        self.trajectory = _trajectory_of(model, profile, trajectory)
        memory = _memory_of(profile, memory)
        self.memory = memory
        extra = ([(TRAJECTORY, self.trajectory.threshold_)] if self.trajectory is not None else []) + (
            [(REPEATED_TRIGGER, memory.threshold_), (RESIDUAL_NOISE, memory.energy_threshold_)] if memory is not None
            else [])
        self._extra_names = [*self.names, *(n for n, _ in extra)]
        self._extra_thresholds = np.append(self.thresholds, [t for _, t in extra])

    def _restore(self, name: str, cls, settings: dict, tensors: dict):
        """A check or the ensemble rebuilt from its profile entry; ProfileError when the entry is unusable."""
        if cls is None:
            raise ProfileError(f"the profile names an unknown {name!r}: rescan it with this guard")
        try:
            return cls.from_profile(settings, tensors, fpr=self.profile.fpr)
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"the profile's {name} entry is incomplete or malformed ({e!r}): "
                               "rescan the model") from e

    def _decision_rule(self) -> FisherEnsemble | UnionRule:
        """The profile's calibrated ensemble over the checks, or, for a profile from before the ensemble,
        the union of the checks' own thresholds."""
        if self.profile.ensemble is None:
            return UnionRule(self.thresholds).fit()
        rule = self._restore(f"ensemble {self.profile.ensemble.method}", RULES.get(self.profile.ensemble.method),
                             *self.profile.ensemble_state())
        if rule.refs_.shape[0] != len(self.checks):
            raise ModelError("the profile's ensemble does not match its checks: rescan the model")
        return rule

    @property
    def token_statistics(self) -> TokenStatistics | None:
        """The profile's token statistics that the tap computes (None for a model that is not a token model)."""
        return self._tokens

    @contextlib.contextmanager
    def session(self) -> Iterator[Guard]:
        """Keep the feature hook registered for a block of calls, a serving worker's lifetime, instead of
        registering and removing it on every call (a measurable share of a batch-1 call's fixed cost,
        docs/benchmarks.md). The hook is removed when
        the block exits, exceptions included; nested sessions share the outer one's hook."""
        if self._tap is not None:
            yield self
            return
        with FeatureTap(self.model, self._layer_module, inner=self._inner_module, tokens=self._tokens) as tap:
            self._tap = tap
            try:
                yield self
            finally:
                self._tap = None

    def warmup(self) -> Guard:
        """Run one neutral input and one batch of two through the whole path, so a serving worker's first
        request does not pay for compiling the scorer (:mod:`guard.online.scoring`: one for single inputs,
        which pools the inner layer itself, one for batches) or loading the kernels."""
        self.run(np.full((1, *self.input_shape), 0.5, dtype=np.float32))
        self.run(np.full((2, *self.input_shape), 0.5, dtype=np.float32))
        if self.memory is not None:  # the neutral inputs are not traffic
            self.memory.reset()
        return self

    # ------------------------------------------------------------------ core
    def _tapped(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None]:
        """One forward pass with the taps: logits and features (numpy), the inner layer's raw output."""
        if self._tap is not None:  # inside session(): the hooks are already there
            with torch.inference_mode():
                logits = self.model(torch.from_numpy(x))
            tap = self._tap
        else:
            with torch.inference_mode(), FeatureTap(self.model, self._layer_module, inner=self._inner_module,
                                                    tokens=self._tokens) as tap:
                logits = self.model(torch.from_numpy(x))
        return logits.numpy(), tap.features.numpy(), tap.inner if self._inner_module is not None else None

    def _forward(self, x: np.ndarray) -> Record:
        logits, features, inner = self._tapped(x)
        return Record(x, logits, features, None if inner is None else pool(inner.numpy()))

    def _evaluate(self, record: Record) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(scores, contributions, statistic)`` of a record: every check's kernel, then the rule's."""
        return scoring.run_rows(self._kernels, self._params, *self._rule, record.x, record.logits,
                                record.features, record.inner)

    def _score_one(self, x: np.ndarray, logits: np.ndarray, features: np.ndarray, inner: torch.Tensor | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_evaluate` of one input straight from the forward pass's arrays (the inner layer
        unpooled): one compiled call, no Record, no copies."""
        inn = self._no_inner if inner is None else inner.numpy()
        if not (x.flags.c_contiguous and features.flags.c_contiguous and inn.flags.c_contiguous):
            x, features, inn = (np.ascontiguousarray(a) for a in (x, features, inn))
        out = scoring.output(1)
        self._one(self._params, self._rule[1], x, logits, features, inn, out)
        return scoring.split(out, len(self.checks))

    def scores(self, record: Record) -> np.ndarray:
        """``(N, n_checks)`` scores of a record, columns in ``self.names`` order."""
        return self._evaluate(record)[0]

    def score(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every check's score for a batch (for evaluation and benchmarks)."""
        s = self.scores(self._forward(validate_batch(x, shape=self.input_shape)))
        return {n: s[:, i] for i, n in enumerate(self.names)}

    def run(self, x: np.ndarray | torch.Tensor) -> GuardResult:
        """Validate, forward once with the feature tap, score every check, apply the policy."""
        t0 = time.perf_counter()
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = validate_batch(x, shape=self.input_shape, what="input")
        t1 = time.perf_counter()
        traced = self.trajectory.tracing() if self.trajectory is not None else contextlib.nullcontext()
        with traced as tracer:
            if len(x) == 1:  # the hot path: one scorer call after the forward, pooling the inner layer itself
                logits, features, inner = self._tapped(x)
            else:
                rec = self._forward(x)
                logits = rec.logits
        t2 = time.perf_counter()
        if len(x) == 1:
            s, strength, stat = self._score_one(x, logits, features, inner)
        else:
            s, strength, stat = self._evaluate(rec)
        extra = []  # the second-tier checks' (score, hit) columns, after the forward and before any repair
        if self.trajectory is not None:
            t = self.trajectory.score_traced(tracer, logits)
            extra.append((t, t > self.trajectory.threshold_))
        ts = time.perf_counter()
        suspect = stat > self.ensemble.threshold_
        any_suspect = bool(suspect[0]) if len(suspect) == 1 else bool(suspect.any())
        if any_suspect:  # every suspect input names a reason: its own-threshold checks, else the strongest
            over = (s > self.thresholds) & suspect[:, None]
            none = suspect & ~over.any(1)
            over[none, strength[none].argmax(1)] = True
            codes = suspect * _SUSPECT_CODE[self.mode]
        else:
            over = np.zeros(s.shape, dtype=bool)
            codes = np.zeros(len(s), dtype=np.int64)
        repaired = {}
        predicted = logits.argmax(1) if self.memory is not None else None  # what the model answered, unrepaired
        if self.mode == "repair" and any_suspect:
            logits = logits.copy()
            idx = np.flatnonzero(suspect)
            fixed, s2 = self._repair(x[idx])
            still = self.suspect(s2)
            codes[idx[still]] = 1  # still suspect after repair: reject
            logits[idx] = fixed
            repaired = {int(i): s2[j] for j, i in enumerate(idx)}
        names, thresholds = self.names, self.thresholds
        if self.memory is not None:  # the stateful check
            m, e = self.memory.check(x, predicted)
            repeated, noisy = self.memory.hits(m, e)
            extra += [(m, repeated), (e, noisy)]
        if extra:  # second-tier hits are rejected (flagged in shadow), never repaired
            names, thresholds = self._extra_names, self._extra_thresholds
            s, over, strength, hit = _second_tier(s, over, strength, suspect, extra)
            if hit is not None:
                codes = np.where(hit & (codes != 3), 3 if self.mode == "shadow" else 1, codes)
        t3 = time.perf_counter()
        return GuardResult(names, logits, s, thresholds, over, codes, repaired, stat, float(self.ensemble.threshold_),
                           strength, (t0, t1, t2, ts, t3))

    def unguarded(self, x: np.ndarray | torch.Tensor) -> list[Decision]:
        """The bare model's answers for a batch, marked verdict ``error`` with reason ``guard_error``:
        what a fail-open service returns when the guard itself failed. No checks run; ``x`` is only
        converted to float32, so this works on input the guard could not score."""
        return [Decision(label, p, "error", ["guard_error"], {}) for label, p in bare_predictions(self.model, x)]

    def statistic(self, scores: np.ndarray) -> np.ndarray:
        """``(N,)`` the ensemble's combined score of ``(N, n_checks)`` check scores (higher = more suspect)."""
        return self.ensemble.statistic(scores)

    def suspect(self, scores: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """``(N,)`` whether the ensemble finds each input suspect (at ``threshold``, default the profile's)."""
        return self.ensemble.statistic(scores) > (self.ensemble.threshold_ if threshold is None else threshold)

    def predict(self, x: np.ndarray | torch.Tensor) -> list[Decision]:
        """Decisions for a batch ``(N, C, H, W)`` in [0, 1]; raises InputError on bad input."""
        return self.run(x).decisions

    def _repair(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits and check scores of ``x`` after painting the located trigger over."""
        w, b = self._neuron
        region = repair.locate(self.model, x, self.fill, pixels=self.repair_pixels, layer=self.layer,
                                neuron_weights=w, neuron_bias=b, masks=self._masks)
        rec = self._forward(repair.apply(x, region, self.fill))
        return rec.logits, self.scores(rec)


def _second_tier(s: np.ndarray, over: np.ndarray, strength: np.ndarray, suspect: np.ndarray,
                 extra: list[tuple[np.ndarray, np.ndarray]]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The scores, reasons and strengths with the second-tier checks' ``(score, hit)`` columns appended, and which
    inputs any of them hit (None where none did: the common case costs one allocation per array and no
    per-column ``np.where``). A hit's reason leads where the ensemble passed the input and follows the
    checks' reasons where it did not."""
    n, c = s.shape
    k = len(extra)
    s2 = np.empty((n, c + k), dtype=s.dtype)
    s2[:, :c] = s
    over2 = np.zeros((n, c + k), dtype=bool)
    over2[:, :c] = over
    strength2 = np.zeros((n, c + k), dtype=strength.dtype)
    strength2[:, :c] = strength
    hit = None
    for j, (column, h) in enumerate(extra):
        s2[:, c + j] = column
        if h.any():
            over2[:, c + j] = h
            strength2[:, c + j] = np.where(h, np.where(suspect, -1.0, np.inf), 0.0)
            hit = h if hit is None else hit | h
    return s2, over2, strength2, hit


def _tokens_of(profile: Profile, modules: dict[str, nn.Module]) -> TokenStatistics | None:
    """The profile's token statistics (None when it has none); ModelError or ProfileError when unusable."""
    state = profile.token_state()
    if state is None:
        return None
    blocks, tensors = state
    missing = [b for b in blocks if b not in modules]
    if missing:
        raise ModelError(f"the profile's token blocks {missing} are not modules of the model")
    try:
        return TokenStatistics.from_profile(blocks, tensors)
    except (KeyError, ValueError) as e:
        raise ProfileError(f"the profile's token statistics are incomplete or malformed ({e!r}): rescan the model"
                           ) from e


def _memory_of(profile: Profile, memory: TriggerMemory | bool | None) -> TriggerMemory | None:
    """The trigger memory a guard runs with: the profile's when ``memory`` is None (True: and refuse a
    profile without one), none when False, else the calibrated one given."""
    if memory is None or memory is True:
        if profile.memory is None and memory is True:
            raise ProfileError("the profile has no trigger memory: rescan with guard scan --memory all")
        memory = TriggerMemory.from_profile(profile)
    elif memory is False:
        memory = None
    if memory is not None and getattr(memory, "threshold_", None) is None:
        raise ModelError("the trigger memory is not calibrated: call infer_threshold on clean images first")
    return memory


def _trajectory_of(model: nn.Module, profile: Profile, trajectory: Trajectory | bool | None) -> Trajectory | None:
    """The trajectory check a guard runs with: the profile's when ``trajectory`` is None (True: and refuse a
    profile without one), none when False, else the calibrated one given."""
    if trajectory is None or trajectory is True:
        state = profile.trajectory_state()
        if state is None:
            if trajectory is True:
                raise ProfileError("the profile has no trajectory check: rescan with guard scan --trajectory")
            return None
        try:
            return Trajectory.from_profile(model, *state, tuple(profile.input_shape))
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"the profile's trajectory entry is incomplete or malformed ({e!r}): rescan the model"
                               ) from e
    if trajectory is False:
        return None
    if getattr(trajectory, "threshold_", None) is None:
        raise ModelError("the trajectory check is not calibrated: call infer_threshold on clean images first")
    return trajectory


def bare_predictions(model: nn.Module, x: np.ndarray | torch.Tensor) -> list[tuple[int, list[float]]]:
    """The bare model's label and probabilities per input, rounded as the guard's own answers are: what the
    stock handler serves and what a fail-open guard falls back to."""
    xt = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    with torch.inference_mode():
        p = softmax(model(xt.float()).numpy())
    return [(int(row.argmax()), [round(float(v), 6) for v in row]) for row in p]
