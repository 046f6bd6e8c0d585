"""``STPConfig``: every knob of STP/ST training and search, with the proposed defaults.

The STP paper's code was never published and its method section could not be retrieved, so most
of these are reconstructions (``ALGORITHMS.md`` section 2, marked [I] there); each is a documented
knob so the library can follow the paper once it is known.  ``validate()`` rejects bad values with
a ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

METHODS = ("stp", "st", "dense")
EXPANSIONS = ("progressive", "assistant", "off")
KD_REDUCTIONS = ("sum", "mean")
SCORE_BASELINES = ("none", "trend")
POOL_INITS = ("fit", "balanced")
SAMPLINGS = ("multi", "depth")
SELECT_BY = ("kd", "top1")


@dataclass
class STPConfig:
    """Configuration of :class:`stp_fast.train.STPTrainer`.

    Training
        method: ``"stp"`` (pool + KD-guided exploration + mutating expansion) or ``"st"`` (plain
            stimulative training: uniformly random subnets, no pool updates, no expansion).
        epochs, batch_size: per process (DDP: per rank).
        lr, momentum, nesterov, weight_decay, warmup_epochs: SGD with a per-iteration cosine schedule
            (the ST++ recipe).  From a dense checkpoint use a lower ``lr`` (ALGORITHMS.md gotcha 14).
        label_smoothing: of the full net's cross-entropy.
        subnets_per_step: K, subnet forwards per step besides the full net (an expanded subnet and
            its budget arch count as two).
        kd_temperature, kd_weight: T and lambda of ``lambda * T^2 * KL(softmax(main/T) || softmax(sub/T))``.
        kd_reduction: ``"sum"`` (each subnet's KL added to the full net's CE) or ``"mean"`` (their mean:
            the subnets together weigh as much as the full net, the ST/ST++ scale for one subnet).
            Default ``"mean"``: with ``"sum"`` the K subnets outweigh the full net's CE and the teacher
            fell 3 points below dense training (benchmarks/accuracy.py ablation, README "Pruning quality").
        kd_ramp: fraction of training over which the KD weight rises linearly from 0 (0 = off).
        subnet_ce_weight: weight of the subnets' own label cross-entropy, reduced over the subnets like the
            KD (0 = KD only, the paper's loss).  Default 1.0 (with the focus phase below): the subnets
            learn from the labels as much as from the teacher; 0.5 gave +1.0 / +0.9 points at 15% / 5% MACs
            over 0 in the ablation (README "Pruning quality").
        norm_kd: ST++ "KD-": layer-normalise teacher and student logits before the KL (not the CE).
        sampling: ``"multi"`` (depth and width) or ``"depth"`` (ST's original: depth only, full widths).
        augment: passed to the data source (``True``: its default policy).
        amp: bfloat16 autocast on CUDA (ignored on the CPU).
        device: ``"auto"`` (CUDA when visible), ``"cpu"`` or ``"cuda[:i]"``.
        seed: every random choice (data order, augmentation, archs) derives from it.
        grad_clip: max global gradient norm (0 = off).
        eval_every: epochs between top-1 evaluations of the full net on the validation set (0 = only
            at the end).

    Search
        flops_target: kept fraction of the full net's MACs, in (0, 1); 0.15 = 85% reduction.  A list
            (``[0.15, 0.05]``) trains one pool per budget in the same run and selects one arch per budget.
        budget_tolerance: pool archs have MACs in ``[(1 - tol) * B, B]``.
        pool_size: N archs in the pool.
        pool_update_interval: steps between pool updates (0 = once per epoch).
        pool_replace_fraction: share of the scored pool replaced at each update (the worst ones).
        pool_mutate_share: of the replacements, the share made by mutating the best archs (the rest
            are random budget archs, for diversity).
        pool_sample_prob: chance a budget arch is drawn from the pool; otherwise a mutation of a
            random pool member is trained (exploration that does not enter the pool).
        mutate_prob: per-gene move probability of a mutation.
        score_ema: EMA factor of an arch's KD-loss score (higher = longer memory).
        score_normalize: divide a step's KD losses by their mean over the step's budget archs
            (removes batch difficulty; noisy with few archs per step).
        expansion: ``"progressive"`` (an expanded superset of each budget arch, its MACs annealed
            from ``expansion_start`` x full to the budget over the first ``expansion_anneal`` of
            training, trained before it from the full net), ``"assistant"`` (a bridge superset with
            MACs uniform in [B, full] is the budget arch's teacher), or ``"off"``.
        score_baseline: ``"none"`` (an arch's score is the EMA of its KD losses) or ``"trend"`` (the EMA of
            its KD loss divided by the pool's running mean KD at the same step: KD falls during training, so
            raw EMAs favour archs added late; relative scores compare old and new archs fairly).  Default
            ``"trend"`` (with ``pool_init="balanced"``: no measurable cost, one seed; removes the age bias).
        pool_init: ``"fit"`` (random archs shrunk/grown into the band by random genes) or ``"balanced"``
            (each arch takes a random share of its MACs cut from depth first, the rest from width, so
            the pool covers depth- and width-heavy reductions evenly).  Default ``"balanced"``.
        focus_start: fraction of training after which the pools are frozen and every budget subnet is
            one of each pool's ``focus_top`` best archs (with its expansion): the arch that ships gets
            trained directly (1 = no focus phase).  Defaults 0.4 and 1 (the search keeps the first 40% of
            the steps, then each budget's best arch is trained for the rest): with ``subnet_ce_weight=1``
            +2.0 / +1.0 points at 15% / 5% MACs over 0.6 / 2 / 0.5 (3 seeds, README "Pruning quality").
        final_candidates: best pool archs re-scored at the end.
        select_by: ``"kd"`` (KL to the full net on held-out images, after BN recalibration) or
            ``"top1"`` (held-out accuracy).
        holdout: training images held out of training for the final re-scoring (int count or a
            fraction in (0, 1)); 0 re-scores on (un-augmented) training images.
        calib_images: images for every BN recalibration.
    """

    method: str = "stp"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    subnets_per_step: int = 4
    kd_temperature: float = 1.0
    kd_weight: float = 1.0
    kd_reduction: str = "mean"
    kd_ramp: float = 0.0
    subnet_ce_weight: float = 1.0
    norm_kd: bool = False
    sampling: str = "multi"
    augment: bool = True
    amp: bool = True
    device: str = "auto"
    seed: int = 0
    grad_clip: float = 0.0
    eval_every: int = 1

    flops_target: float | list[float] = 0.15
    budget_tolerance: float = 0.05
    pool_size: int = 50
    pool_update_interval: int = 0
    pool_replace_fraction: float = 0.25
    pool_mutate_share: float = 0.67
    pool_sample_prob: float = 0.8
    mutate_prob: float = 0.1
    score_ema: float = 0.9
    score_normalize: bool = False
    expansion: str = "progressive"
    expansion_start: float = 0.9
    expansion_anneal: float = 0.5
    score_baseline: str = "trend"
    pool_init: str = "balanced"
    focus_start: float = 0.4
    focus_top: int = 1
    final_candidates: int = 5
    select_by: str = "kd"
    holdout: float = 0.1
    calib_images: int = 2000

    def validate(self) -> STPConfig:
        """Raise ValueError naming the first bad field; return self."""
        _choice("method", self.method, METHODS)
        _choice("expansion", self.expansion, EXPANSIONS)
        _choice("sampling", self.sampling, SAMPLINGS)
        _choice("select_by", self.select_by, SELECT_BY)
        _choice("kd_reduction", self.kd_reduction, KD_REDUCTIONS)
        _choice("score_baseline", self.score_baseline, SCORE_BASELINES)
        _choice("pool_init", self.pool_init, POOL_INITS)
        for name in ("epochs", "batch_size", "pool_size", "final_candidates", "calib_images", "focus_top"):
            _int(name, getattr(self, name), low=1)
        for name in ("subnets_per_step", "pool_update_interval", "seed", "eval_every"):
            _int(name, getattr(self, name), low=0)
        targets = self.flops_target if isinstance(self.flops_target, (list, tuple)) else [self.flops_target]
        if not targets:
            raise ValueError("STPConfig.flops_target must be a number or a non-empty list of numbers in (0, 1)")
        for t in targets:
            _num("flops_target", t, 0.0, 1.0, open_low=True, open_high=True)
        if len(set(targets)) != len(targets):
            raise ValueError(f"STPConfig.flops_target lists a budget twice: {list(targets)}")
        _num("lr", self.lr, 0.0, math.inf, open_low=True)
        for name in ("momentum", "score_ema", "pool_sample_prob", "mutate_prob", "pool_mutate_share",
                     "expansion_anneal", "label_smoothing", "kd_ramp", "focus_start"):  # fmt: skip
            _num(name, getattr(self, name), 0.0, 1.0)
        _num("pool_replace_fraction", self.pool_replace_fraction, 0.0, 1.0, open_high=True)
        _num("budget_tolerance", self.budget_tolerance, 0.0, 1.0, open_high=True)
        _num("expansion_start", self.expansion_start, 0.0, 1.0, open_low=True)
        for name in ("weight_decay", "warmup_epochs", "kd_weight", "grad_clip", "subnet_ce_weight"):
            _num(name, getattr(self, name), 0.0, math.inf)
        _num("kd_temperature", self.kd_temperature, 0.0, math.inf, open_low=True)
        h = self.holdout
        if isinstance(h, bool) or not isinstance(h, (int, float)) or h < 0 or not (h < 1 or float(h).is_integer()):
            raise ValueError(f"STPConfig.holdout must be a fraction in [0, 1) or a whole image count, got {h!r}")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"STPConfig.device must be 'auto', 'cpu' or 'cuda[:i]', got {self.device!r}")
        return self

    def targets(self) -> list[float]:
        """The budgets as a list (``flops_target`` may be one number or several)."""
        t = self.flops_target
        return [float(v) for v in t] if isinstance(t, (list, tuple)) else [float(t)]

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if isinstance(data["flops_target"], tuple):
            data["flops_target"] = list(data["flops_target"])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> STPConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"STPConfig: unknown fields {unknown}")
        return cls(**data)


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"STPConfig.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"STPConfig.{name} must be an int >= {low}, got {value!r}")


def _num(name: str, value, low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)) or value == math.inf
    if ok:
        ok = (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"STPConfig.{name} must lie in {lo}{low}, {high}{hi}, got {value!r}")
