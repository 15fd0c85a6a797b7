"""What a benchmark run depends on and where it writes: :class:`BenchConfig`, the presets, the data.

A preset names the attacks, the networks, the zoo's data and every budget of a run; :func:`preset`
replaces some fields. :func:`bench_data` draws the run's images once per process (a worker runs
several attacks on the same data); :func:`profile_dir` is where a row's profile is saved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from guard.bench.models import ZooConfig
from guard.demo.attacks.zoo import zoo_data
from guard.demo.glyphs import glyphs

SCHEMA_VERSION = 1


ALL_ATTACKS = ("badnets", "blended", "sig", "wanet", "input_aware", "trojannn", "all_to_all", "adap_blend",
               "adap_patch", "tact", "bpp", "label_consistent", "badnets_random")


#: The quick preset's sample: the classic attacks and the two adaptive attacks built against feature-space checks.
QUICK_ATTACKS = ("badnets", "blended", "sig", "wanet", "input_aware", "trojannn", "all_to_all", "adap_patch",
                 "adap_blend")


#: The networks the full preset trains every attack on (names of guard.demo.attacks.zoo.NETS).
ALL_NETS = ("demo_net", "resnet18")


#: Online checks that every row reports (null where the profile has none, e.g. no suspect label).
REPORTED_CHECKS = ("feature", "knn", "consistency", "neuron", "overlap")


@dataclass(frozen=True)
class BenchConfig:
    """Everything a benchmark run depends on; ``preset`` names one of :data:`PRESETS`.

    Every attack is trained and measured on each of ``nets`` (``zoo.net`` is replaced by each in turn);
    the performance figures are measured on the first.
    """

    preset: str
    attacks: tuple[str, ...]
    zoo: ZooConfig
    nets: tuple[str, ...] = ("demo_net",)
    n_clean: int = 1000  # clean images for the scan (half) and the calibration (other half)
    n_eval: int = 500  # clean and triggered test images per attack
    fpr: float = 0.01
    nc_max_rounds: int = 200
    dl_tnd: dict[str, Any] | None = field(default_factory=dict)  # DLTND keyword overrides; None: skip
    df_tnd: dict[str, Any] | None = field(default_factory=dict)  # DFTND keyword overrides; None: skip
    blend: dict[str, Any] | None = field(default_factory=dict)  # BlendReversal keyword overrides; None: skip
    strip_n: int = 100
    strip_calibration: int = 500  # clean held-out images that set STRIP's boundary (pool: the scan half)
    art: bool = True
    art_pool: int = 500  # clean images ART's mitigate() superimposes and calibrates on
    overhead_repeats: int = 200
    nc_speed_rounds: int = 20
    torchserve: bool = True
    ts_requests: int = 50
    ts_rounds: int = 10
    ts_concurrency: int = 4
    # guarded over baseline also at these client counts and archive batch sizes (dynamic batching), on
    # TorchServe's port and through the ingress; () skips the grid
    ts_grid_clients: tuple[int, ...] = (4, 16)
    ts_grid_batch_sizes: tuple[int, ...] = (1, 8)
    knn: bool = True  # the guard's nearest-neighbour feature check (build_profile(knn=...))
    # the guard's opt-in trajectory check on every row's profile (build_profile(trajectory=...), guard scan
    # --trajectory): the rows then measure the guard a user who turned it on deploys
    trajectory: bool = False
    flip_check: bool = True  # evaluate the opt-in mirror-consistency check next to the guard
    scaling: bool = True  # Neural Cleanse's scan seconds at 10, 100 and 1000 classes (composed glyphs)
    # guard scan's seconds at 32x32, 64x64 and 224x224 (guard.bench.input_sizes): the full preset's, with scaling
    size_scaling: bool = False
    resnet18_performance: bool = True  # overhead and TorchServe throughput on a BadNets ResNet-18 layout model
    peers: bool = True  # IBD-PSC and SCALE-UP next to STRIP (guard.bench.peers)
    # the white-box attacker on the badnets and blended rows: (Adam steps, surrogate weight) per budget, and a
    # third number where the attacker also evades the trigger memory (that loss's weight); None: skip
    whitebox_budgets: tuple[tuple[float, ...], ...] | None = ((50, 0.3), (150, 1.0), (300, 3.0), (300, 3.0, 10.0))
    # the gray-box attacker on every row whose trigger it can re-optimise (patch, blend key, warp field):
    # (Adam steps, moment-matching weight[, memory-evasion weight[, trajectory-evasion weight]]) per budget, and
    # how many images of its own it draws; None: skip
    graybox_budgets: tuple[tuple[float, ...], ...] | None = ((100, 1.0), (300, 1.0), (300, 3.0), (300, 10.0),
                                                             (300, 1.0, 3.0), (300, 10.0, 10.0),
                                                             (300, 1.0, 3.0, 10.0))
    graybox_images: int = 1500
    # purification with this many clean images per class (a fresh scan of each subset), every method of
    # guard.bench.purification.METHODS judged with the real trigger, and the comeback rows; None: skip
    purify_per_class: tuple[int, ...] | None = (20, 50)
    purify_methods: tuple[str, ...] = ("auto", "fine-pruning", "unlearn", "anp")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["attacks"] = list(self.attacks)
        d["nets"] = list(self.nets)
        d["purify_per_class"] = None if self.purify_per_class is None else list(self.purify_per_class)
        d["purify_methods"] = list(self.purify_methods)
        return d


PRESETS: dict[str, BenchConfig] = {
    # a sample of the attacks (one adaptive) on DemoNet, data and epochs at which they reach their floors
    "quick": BenchConfig(preset="quick", attacks=QUICK_ATTACKS, zoo=ZooConfig(n_train=4000, n_test=1000, epochs=5),
                         n_eval=400, nc_max_rounds=100, strip_calibration=250, art_pool=250, nc_speed_rounds=50,
                         dl_tnd={"iterations": 20, "search_steps": 3, "per_image_iterations": 20},
                         df_tnd={"iterations": 100}, purify_per_class=(20,)),
    "full": BenchConfig(preset="full", attacks=ALL_ATTACKS, zoo=ZooConfig(n_train=6000, n_test=2000, epochs=6),
                        nets=ALL_NETS, n_clean=2000, n_eval=1000, overhead_repeats=500, nc_speed_rounds=100,
                        ts_requests=100, ts_rounds=16, size_scaling=True),
    # the test suite's configuration: checks that the pipeline runs and fills every field, not quality
    "tiny": BenchConfig(preset="tiny", attacks=("badnets",), zoo=ZooConfig(n_train=400, n_test=200, epochs=1),
                        n_clean=120, n_eval=40, nc_max_rounds=3, strip_n=10, strip_calibration=60, art_pool=40,
                        dl_tnd={"samples_per_class": 3, "iterations": 2, "search_steps": 1, "per_image_iterations": 2},
                        df_tnd={"n_seeds": 2, "iterations": 3}, blend={"alphas": (0.1, 0.2), "steps": 2,
                                                                     "refine_steps": 1, "n_eval": 40},
                        overhead_repeats=10, nc_speed_rounds=1, scaling=False, resnet18_performance=False,
                        whitebox_budgets=((2, 0.3), (3, 1.0), (4, 3.0, 1.0)),
                        graybox_budgets=((2, 1.0), (3, 3.0), (3, 1.0, 1.0), (2, 1.0, 1.0, 1.0)),
                        graybox_images=200, purify_per_class=(10,), purify_methods=("fine-pruning",),
                        torchserve=False, ts_requests=5, ts_rounds=2, ts_concurrency=2),
}


def preset(name: str, **overrides: Any) -> BenchConfig:
    """A preset with some fields replaced (``attacks``, ``zoo``, ``torchserve``, ...)."""
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def on_net(cfg: BenchConfig, net: str) -> BenchConfig:
    """``cfg`` with its zoo trained on network ``net``."""
    return replace(cfg, zoo=replace(cfg.zoo, net=net))


def load_data(cfg: BenchConfig):
    d = zoo_data(seed=cfg.zoo.seed, n_train=cfg.zoo.n_train, n_test=cfg.zoo.n_test)
    xc, yc = glyphs(cfg.n_clean, seed=cfg.zoo.seed * 10 + 2)  # the demo world's clean.npz seed
    return d, xc, yc


_DATA_MEMO: dict[tuple, tuple] = {}


def bench_data(cfg: BenchConfig):
    """:func:`load_data` once per process (a worker runs several attacks on the same data)."""
    key = (replace(cfg.zoo, net=""), cfg.n_clean)  # the same data for every network
    if key not in _DATA_MEMO:
        _DATA_MEMO[key] = load_data(cfg)
    return _DATA_MEMO[key]


def profile_dir(profiles: Path, net: str, name: str) -> Path:
    """Where an attack's profile goes: ``profiles/NAME`` for DemoNet, ``profiles/NET/NAME`` otherwise."""
    return profiles / name if net == "demo_net" else profiles / net / name


def log(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(msg)
