"""What one run of the bundled benchmark does: its methods, losses, learning-rate grids, the
MGG's meta-training recipes, the stream regimes, and the sizes (the defaults are the demo's).

Every learning rate is tuned per setting on the validation corruptions only, on validation
streams as long as the test streams and at the same batch size (``n_tune=None``). Every MGG is
meta-trained on unlabeled validation-corruption images until its meta-loss stops improving
(``meta_patience`` epochs without a better epoch, at most ``meta_epochs``); a K-step recipe gets
K times the epochs, so that it is judged after as many meta-updates as the one-step recipe.

Nothing here imports torch (the command line builds its options from these defaults); the
checks import the registry when they run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from mgg_fast.evaluation.corruptions import check_corruption, corruption_names

ARCHS = ("vit", "resnet")  # the bundled source models (mgg_fast.evaluation.bundled.source_models)
LOSSES = ("foa", "entropy")  # mgg_fast.tta.losses.LOSSES
# The methods of a run: NoAdapt, the hand-made optimizers of the shared loss (SGD = Tent, Adam,
# sign momentum), SAR and EATA (their own filtered entropy), the MGG and the MGG without its
# memory (the ablation), and the two reference rows (test-batch normalisation alone; the labels).
METHODS = (
    "noadapt",
    "bn-stats",
    "tent",
    "adam",
    "signum",
    "sar",
    "eata",
    "mgg",
    "mgg-memoryless",
    "supervised",
)
# The demo's: the question "does the learned optimizer help?" (the MGG against the hand-made
# optimizers of its loss and against itself without memory, NoAdapt and the oracle for the room);
# SAR, EATA and the BN-statistics row are one --methods all away (they double the demo's time).
DEMO_METHODS = ("noadapt", "tent", "adam", "signum", "mgg", "mgg-memoryless", "supervised")
SETTINGS = ("episodic", "continual", "mixed")
EATA_D_MARGIN = 0.4  # EATA's redundancy margin on the 10-class scale (ImageNet: 0.05); SHIFT_RESULTS.md
# SGD's step scales with the gradient (tiny on small models' norm params): a wider, ×10 grid. Adam,
# sign momentum and the MGG take normalised steps (the MGG's output is in (-1, 1)): one ×5 grid.
# Each reaches a step beyond the values chosen on the bundled data (a narrower grid left the
# ResNet's choices at its top end and the ViT's at its bottom end; the reports flag an end choice).
SGD_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
NORMALISED_GRID = (4e-5, 2e-4, 1e-3, 5e-3, 2.5e-2, 1.25e-1)
DEFAULT_GRID = {
    "tent": SGD_GRID,
    "sar": SGD_GRID,
    "eata": SGD_GRID,
    "adam": NORMALISED_GRID,
    "signum": NORMALISED_GRID,
    "mgg": NORMALISED_GRID,
    "supervised": NORMALISED_GRID,  # Adam on the labels
    "bn-stats": (0.0,),
}
ORDERS = ("balanced", "label_shift")


@dataclass(frozen=True)
class MetaRecipe:
    """How the benchmark meta-trains an MGG on the validation corruptions.

    ``None`` sizes take the benchmark's (``batch_size``: the evaluation batch; ``epochs`` /
    ``n_meta``: ``meta_epochs`` / ``n_meta``). ``adapt_lr=None``: one MGG per grid lr, trained
    with that lr; ``eval_lr=None``: the lr (and so the MGG) is tuned per setting like the
    baselines' lrs. ``stream``: ``"round_robin"`` (one batch of each corruption in turn) or
    ``"blocks"`` (consecutive batches of one corruption, then the next: a stream that switches).
    ``patience``: stop once the meta-loss has not improved for that many epochs (``None``: the
    benchmark's ``meta_patience``; 0: run every epoch). ``unroll``: the truncation window K, or a
    curriculum of windows (e.g. ``(1, 2, 4, 8)``): each trained until its meta-loss stops
    improving, the next one starting from the MGG the last one kept.
    """

    name: str
    batch_size: int | None = None
    epochs: int | None = None
    n_meta: int | None = None
    adapt_lr: float | None = None
    eval_lr: float | None = None
    unroll: int | tuple[int, ...] = 1
    shuffle: bool = False
    validate: bool = False  # per-epoch validation (episodic accuracy on the tuning streams), best kept
    reset_params: bool = True  # False: the norm params drift across epochs (published init_state)
    stream: str = "round_robin"
    patience: int | None = None

    @property
    def unrolls(self) -> tuple[int, ...]:
        """The windows in the order they are trained (one for a plain K-step recipe)."""
        return self.unroll if isinstance(self.unroll, tuple) else (self.unroll,)

    @property
    def method(self) -> str:
        """The result key of this recipe's MGG: ``mgg`` for the demo recipe, else ``mgg-<name>``."""
        return "mgg" if self.name == "demo" else f"mgg-{self.name}"


RECIPES = {
    "demo": MetaRecipe("demo"),
    "published": MetaRecipe(
        "published",
        batch_size=2,
        epochs=40,
        n_meta=128,
        adapt_lr=1e-4,
        eval_lr=1e-3,
        shuffle=True,
        validate=True,
        reset_params=False,
        patience=0,  # as published: every epoch, the best on validation kept
    ),
    "unroll": MetaRecipe("unroll", n_meta=512, unroll=4, stream="blocks"),
    # Candidates beyond the paper, each tried once (bench/SHIFT_RESULTS.md): meta-train on long
    # episodes that switch corruptions as the test streams do, so the memory is trained over as
    # many steps as it is used for; and the same with 8-step unrolls through the memory.
    "episodes": MetaRecipe("episodes", n_meta=2048, stream="blocks"),
    "episodes-unroll8": MetaRecipe("episodes-unroll8", n_meta=2048, unroll=8, stream="blocks"),
    # and an unroll-length curriculum on the same episodes: K = 1, then 2, 4 and 8.
    "episodes-curriculum": MetaRecipe(
        "episodes-curriculum", n_meta=2048, unroll=(1, 2, 4, 8), stream="blocks"
    ),
}


def recipe_of(spec: str | MetaRecipe) -> MetaRecipe:
    """A recipe by name (:data:`RECIPES`) or as given; ``ValueError`` for an unknown name."""
    if isinstance(spec, MetaRecipe):
        return spec
    if spec not in RECIPES:
        raise ValueError(f"unknown meta-training recipe {spec!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[spec]


# The regimes the paper is about, as changes to the defaults (``demo --regime NAME``): long
# LayerNorm streams (the test images re-corrupted with other noise draws, several hundred
# updates per corruption), small noisy batches, a label-shifted (class-imbalanced) order, and
# the mixed-domain stream besides the episodic and continual ones.
REGIMES: dict[str, dict[str, Any]] = {
    "demo": {},
    "long": {"archs": ("vit",), "batch_size": 16, "n_test": 4800},
    "small-batch": {"batch_size": 8, "n_test": 1000},
    "label-shift": {"order": "label_shift", "n_test": 1000},
    "mixed": {"settings": SETTINGS, "n_test": 1000},
}


@dataclass
class BenchmarkConfig:
    """Sizes and settings of one benchmark run (the defaults are the demo's)."""

    archs: tuple[str, ...] = ARCHS
    corruptions: tuple[str, ...] | None = None  # None: the 15 test corruptions
    val_corruptions: tuple[str, ...] | None = None  # None: the 4 validation corruptions
    severity: int = 5
    n_test: int | None = 256  # images per test corruption; None: all 1,000 of the split
    n_tune: int | None = None  # labeled validation images per validation corruption; None: as n_test
    n_meta: int = 256  # unlabeled validation-corruption images for meta-training (all corruptions)
    batch_size: int = 64
    loss: str = "foa"
    extra_losses: tuple[str, ...] = ()  # the shared-loss methods again with each of these losses
    methods: tuple[str, ...] = DEMO_METHODS
    settings: tuple[str, ...] = ("episodic", "continual")
    order: str = "balanced"  # or "label_shift": each stream in class-imbalanced runs
    n_stats: int = 512  # clean training images for the source statistics and EATA's Fisher
    meta_epochs: int = 40  # the most; the meta-loss's plateau usually ends it earlier
    meta_patience: int = 3  # epochs without a 0.1% better meta-loss
    mgg_lr: float = 1e-2
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_GRID))
    recipes: tuple[str | MetaRecipe, ...] = ("demo",)
    use_bundled: bool = True  # the shipped source models and MGGs where they fit (False: train them)
    source_epochs: int | None = None  # None: each architecture's default
    n_train: int | None = None  # source-model training images; None: all 3,500
    seed: int = 0  # the first seed
    n_seeds: int = 1  # seeds seed, seed + 1, ...
    threads: int | None = None  # torch intra-op threads for the run; None: leave torch's setting
    device: str = "cpu"
    dtype: str = "float32"  # of the evaluation (float64: the same numbers on any x86-64 CPU)
    backend: str = "auto"
    mgg_memory: str = "float32"  # storage of the MGG optimizer's memory matrices (MEMORY_DTYPES)

    @classmethod
    def regime(cls, name: str, **overrides: Any) -> BenchmarkConfig:
        """The defaults changed by regime ``name`` (:data:`REGIMES`), then by ``overrides``."""
        if name not in REGIMES:
            raise ValueError(f"unknown regime {name!r}; choose from {', '.join(REGIMES)}")
        return replace(cls(), **{**REGIMES[name], **overrides})

    def validate(self) -> None:
        """Raise ``ValueError`` for sizes or names that cannot work."""
        from mgg_fast.tta.registry import METHODS as REGISTERED
        from mgg_fast.tta.registry import memory_dtype

        for name in ("n_meta", "batch_size", "n_stats", "meta_epochs", "n_seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("n_test", "n_tune", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.meta_patience < 0:
            raise ValueError(f"meta-patience must be >= 0, got {self.meta_patience}")
        losses = (self.loss, *self.extra_losses)
        if any(loss not in LOSSES for loss in losses) or len(set(losses)) != len(losses):
            raise ValueError(f"losses must be distinct names among {', '.join(LOSSES)}, got {losses}")
        if self.batch_size < 2 and "foa" in losses:
            raise ValueError("batch-size must be at least 2 for the foa loss (it uses the batch std)")
        if not 1 <= self.severity <= 5:
            raise ValueError(f"severity must be in 1..5, got {self.severity}")
        memory_dtype(self.mgg_memory)
        for arch in self.archs:
            if arch not in ARCHS:
                raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
        for name in (*self.test_corruptions(), *self.validation_corruptions()):
            check_corruption(name)
        unknown = [m for m in self.methods if m not in REGISTERED]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct registered methods, got {self.methods}")
        if "mgg-memoryless" in self.methods and "mgg" not in self.methods:
            raise ValueError("mgg-memoryless evaluates the MGG of the mgg rows: list mgg too")
        if not self.settings or any(s not in SETTINGS for s in self.settings):
            raise ValueError(f"settings must be among {', '.join(SETTINGS)}, got {self.settings}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        for method in self.methods:
            grid = self.grid(method)
            if REGISTERED[method].default_lr is None:  # NoAdapt: nothing to tune
                continue
            if not grid or any(not (lr >= 0 and math.isfinite(lr)) for lr in grid):
                raise ValueError(f"the {method} learning-rate grid must hold numbers >= 0, got {grid}")
        recipes = [recipe_of(r) for r in self.recipes]
        if not recipes or len({r.method for r in recipes}) != len(recipes):
            raise ValueError("recipes must name at least one meta-training recipe, each once")
        for r in recipes:
            if r.stream not in ("round_robin", "blocks"):
                raise ValueError(f"recipe {r.name!r}: stream must be round_robin or blocks, got {r.stream!r}")
            if not r.unrolls or any(not isinstance(k, int) or k < 1 for k in r.unrolls):
                raise ValueError(
                    f"recipe {r.name!r}: unroll must be a positive int or a tuple of them, got {r.unroll!r}"
                )

    def grid(self, method: str) -> tuple[float, ...]:
        """The learning rates tuned for ``method`` (the MGG's for its memoryless ablation; a
        method without a grid: its default learning rate alone)."""
        from mgg_fast.tta.registry import METHODS as REGISTERED

        name = "mgg" if method.startswith("mgg") else method
        if name in self.lr_grid:
            return tuple(self.lr_grid[name])
        default = REGISTERED[name].default_lr
        return () if default is None else (default,)

    def test_corruptions(self) -> list[str]:
        return list(self.corruptions) if self.corruptions else corruption_names("test")

    def validation_corruptions(self) -> list[str]:
        return list(self.val_corruptions) if self.val_corruptions else corruption_names("validation")

    def tune_images(self) -> int | None:
        """Images per validation stream: as the test streams, unless ``n_tune`` says otherwise."""
        return self.n_test if self.n_tune is None else self.n_tune

    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.n_seeds))
