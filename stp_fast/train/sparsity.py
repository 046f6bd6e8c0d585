"""Sparsity machinery of IEE and its baselines (``ALGORITHMS.md`` section 5): ERK allocation, prunable
*units* (weight tensors or channel groups), masks with stored values, the prune-and-grow decisions
(the importance criteria live in :mod:`stp_fast.train.criteria`, re-exported here), and an SGD that
leaves masked or frozen entries untouched.

A *unit* is what one decision ranks: in unstructured mode one conv/linear weight (its entries), in
channel mode one channel group of the supernet's architecture space (its channels).  A channel
group's tensors are found by probing ``net.extract``: the tensors whose shape shrinks by one along a
dimension when the group loses one channel are exactly the group's (dim 0: producer filters, BN,
biases; dim 1: consumer inputs).  Masking a channel zeroes all of its parameter slices, so with
every nonlinearity mapping 0 to 0 the masked net computes what the net with the channel removed
computes (ALGORITHMS.md gotcha 4: the BN bias is zeroed too).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from stp_fast.arch.space import Arch
from stp_fast.train.criteria import (  # noqa: F401 - re-exported (their home was this module)
    CRITERIA,
    Criterion,
    Magnitude,
    Taylor,
    grad_magnitude,
    make_criterion,
    register_criterion,
)


# ---------------------------------------------------------------------------------------------- ERK
def erk_densities(shapes: Mapping[str, tuple[int, ...]], sparsity: float, dense: Iterable[str] = (),
                  power: float = 1.0) -> dict[str, float]:  # fmt: skip
    """Per-layer densities of the Erdos-Renyi-Kernel allocation (RigL ``get_sparsities_erdos_renyi``).

    ``raw_l = (sum(shape_l) / prod(shape_l)) ** power`` (for a conv ``(n_out, n_in, h, w)`` that is
    RigL's ``(n_in + n_out + h + w) / (n_in n_out h w)``; for a linear layer ER's ``(n_in + n_out) /
    (n_in n_out)``); ``eps`` solves ``sum_{l not dense} eps raw_l N_l = (1 - S) sum_l N_l - sum_{l dense}
    N_l``, so the whole set of layers -- ``dense`` ones included, at density 1 -- has sparsity ``S``.
    A layer whose ``eps raw_l`` exceeds 1 joins the dense set and ``eps`` is recomputed (fix-point).

    Raises ValueError when the layers forced dense already hold more than ``(1 - S)`` of all weights.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"erk_densities: sparsity must lie in [0, 1), got {sparsity}")
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: (sum(s) / sizes[k]) ** power for k, s in shapes.items()}
    dense = set(dense)
    unknown = dense - set(shapes)
    if unknown:
        raise ValueError(f"erk_densities: dense layers {sorted(unknown)} are not among the shapes")
    total = sum(sizes.values())
    while True:
        free = [k for k in shapes if k not in dense]
        if not free:
            break
        rhs = (1.0 - sparsity) * total - sum(sizes[k] for k in dense)
        if rhs < 0:
            raise ValueError(f"erk_densities: the layers kept dense ({sorted(dense)}) hold more than "
                             f"{100 * (1 - sparsity):.1f}% of the weights; sparsity {sparsity} is unreachable")
        eps = rhs / sum(raw[k] * sizes[k] for k in free)
        top = max(eps * raw[k] for k in free)
        if top <= 1.0:
            break
        dense |= {k for k in free if eps * raw[k] >= top * (1 - 1e-12)}
    return {k: 1.0 if k in dense else eps * raw[k] for k in shapes}


def erk_counts(shapes: Mapping[str, tuple[int, ...]], sparsity: float, dense: Iterable[str] = (),
               power: float = 1.0) -> dict[str, int]:  # fmt: skip
    """Kept weights per layer: the ERK densities rounded so the total is exactly
    ``round((1 - S) * N_total)`` (largest remainders get the spare weights), at least 1 and at most
    ``N_l`` per layer."""
    dens = erk_densities(shapes, sparsity, dense, power)
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    want = {k: dens[k] * sizes[k] for k in shapes}
    counts = {k: min(sizes[k], max(1, math.floor(v))) for k, v in want.items()}
    target = round((1.0 - sparsity) * sum(sizes.values()))
    spare = target - sum(counts.values())
    order = sorted(shapes, key=lambda k: want[k] - math.floor(want[k]), reverse=spare > 0)
    while spare:
        moved = False
        for k in order:
            step = 1 if spare > 0 else -1
            if (step > 0 and counts[k] < sizes[k]) or (step < 0 and counts[k] > 1):
                counts[k] += step
                spare -= step
                moved = True
                if not spare:
                    break
        if not moved:
            break
    return counts


# ---------------------------------------------------------------------------------------------- units
@dataclass
class Unit:
    """One prunable unit.  ``slices`` lists ``(tensor name, dim)``; dim -1 means elementwise (an
    unstructured weight), dim 0 a producer slice (filters, BN, biases), dim >= 1 a consumer input.
    ``params`` marks which names are parameters (the rest are buffers: permuted, never masked)."""

    name: str
    size: int
    slices: list[tuple[str, int]]
    params: set[str] = field(default_factory=set)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def elementwise(self) -> bool:
        return self.slices[0][1] < 0

    def reduce(self, fn: Callable[[str], Tensor], kind: str = "weights", mean: bool = False) -> Tensor:
        """Scores of the unit's entries from a per-tensor map ``fn(name)`` (same shape as the tensor).

        Elementwise units return ``fn(name).flatten()``.  Channel units sum, per channel, over the
        producer slices: ``kind="weights"`` the >= 2-D parameters (filters), ``"bn"`` the 1-D ones
        (BN affine, biases), each falling back to the other when the group has none; ``mean`` divides
        each slice's sum by its entries per channel (comparable across fan-ins)."""
        if self.elementwise:
            return fn(self.slices[0][0]).flatten()
        prod = [(n, d) for n, d in self.slices if d == 0 and n in self.params]
        pick = {"weights": [s for s in prod if len(self.shapes[s[0]]) >= 2],
                "bn": [s for s in prod if len(self.shapes[s[0]]) == 1]}  # fmt: skip
        if kind not in pick:
            raise ValueError(f"Unit.reduce: kind must be 'weights' or 'bn', got {kind!r}")
        chosen = pick[kind] or pick["weights" if kind == "bn" else "bn"]
        out = None
        for name, _ in chosen:
            v = fn(name).reshape(self.size, -1)
            v = v.mean(1) if mean else v.sum(1)
            out = v if out is None else out + v
        return out


def weight_units(net: nn.Module, skip: Iterable[str] = ()) -> list[Unit]:
    """One elementwise unit per Conv2d / Linear weight of ``net`` (module order), except ``skip``."""
    skip = set(skip)
    out = []
    for mname, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            name = f"{mname}.weight" if mname else "weight"
            if name not in skip:
                out.append(Unit(name, m.weight.numel(), [(name, -1)], {name}, {name: tuple(m.weight.shape)}))
    return out


def first_and_classifier(net: nn.Module) -> tuple[str, str]:
    """Names of the first conv/linear weight and of the last Linear weight (the classifier)."""
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    if not layers or not linears:
        raise ValueError("the network has no conv/linear layer or no Linear classifier")
    return f"{layers[0][0]}.weight", f"{linears[-1]}.weight"


@torch.no_grad()
def channel_units(net: nn.Module) -> tuple[list[Unit], dict[str, str]]:
    """One unit per channel group of ``net.space`` whose channels are single slices of its tensors,
    found by probing ``net.extract``; returns ``(units, {skipped group: reason})``.  A skipped group
    (e.g. whole attention heads, several rows per unit) stays at full width."""
    space = net.space
    full = space.full()
    ref = {k: tuple(v.shape) for k, v in net.extract(full).state_dict().items()}
    own = dict(net.state_dict(keep_vars=True))
    params = {n for n, _ in net.named_parameters()}
    units, skipped = [], {}
    for group, size in space.groups.items():
        if size < 2:
            skipped[group] = "a single channel"
            continue
        widths = full.widths
        widths[group] = size - 1
        probe = net.extract(Arch.make(full.depth, widths)).state_dict()
        slices, why = [], None
        for name, t in probe.items():
            for d, (a, b) in enumerate(zip(ref[name], t.shape)):
                if a == b:
                    continue
                if a - b != 1 or a != size or d > 1 or name not in own or tuple(own[name].shape) != ref[name]:
                    why = f"{name} dim {d} shrinks from {a} to {b} (not one slice per channel)"
                slices.append((name, d))
        if why or not slices:
            skipped[group] = why or "no tensor depends on it"
            continue
        names = {n for n, _ in slices}
        units.append(Unit(group, size, slices, names & params, {n: tuple(own[n].shape) for n in names}))
    if not units:
        raise ValueError(f"{type(net).__name__}: no channel group can be pruned channel by channel ({skipped})")
    return units, skipped


@torch.no_grad()
def permute_channels(net: nn.Module, unit: Unit, order: Tensor) -> None:
    """Reorder the channels of a channel unit in every tensor it spans (parameters and BN statistics),
    so channel ``order[i]`` becomes channel ``i``; the network function is unchanged."""
    tensors = dict(net.state_dict(keep_vars=True))
    for name, dim in unit.slices:
        t = tensors[name]
        t.copy_(t.index_select(dim, order.to(t.device)))


@torch.no_grad()
def extract_channels(net: nn.Module, units: list[Unit], unit_masks: dict[str, Tensor]) -> tuple[nn.Module, Arch]:
    """The plain model keeping the active channels of every channel unit: a copy of ``net`` with each
    group's active channels permuted to the front (producers, BN statistics and consumers alike), then
    ``extract`` at those counts.  In eval mode it computes what the masked ``net`` computes."""
    work = copy.deepcopy(net)
    full = net.space.full()
    widths = full.widths
    for u in units:
        m = unit_masks[u.name].cpu()
        order = torch.cat([m.nonzero().flatten(), (~m).nonzero().flatten()])
        permute_channels(work, u, order)
        widths[u.name] = int(m.sum())
    arch = Arch.make(full.depth, widths)
    return work.extract(arch), arch


@torch.no_grad()
def layer_macs(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, float]:
    """MACs of every conv/linear weight of a plain model for one image (weight entries x output positions)."""
    out: dict[str, float] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def hook(mod, _inp, y, key=f"{name}.weight"):
                positions = y[0].numel() / y.shape[1] if isinstance(mod, nn.Conv2d) else y[0].numel() / y.shape[-1]
                out[key] = float(mod.weight.numel() * positions)

            hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return out


# ---------------------------------------------------------------------------------------------- masks
class MaskState:
    """Active/inactive entries of every unit, the per-parameter element masks they imply, and the
    stored values of inactive entries (restored at reactivation with ``regrow_init="restore"``).

    Invariant outside reactivation: every inactive parameter entry is exactly zero."""

    def __init__(self, net: nn.Module, units: list[Unit]) -> None:
        self.units = units
        self.params = dict(net.named_parameters())
        self.unit_masks = {u.name: torch.ones(u.size, dtype=torch.bool, device=self._device(u)) for u in units}
        self.stash = {n: torch.zeros_like(self.params[n]) for n in sorted({n for u in units for n in u.params})}
        self._masks: dict[str, Tensor] | None = None

    def _device(self, unit: Unit) -> torch.device:
        return self.params[next(iter(unit.params))].device

    def param_masks(self) -> dict[str, Tensor]:
        """``{param name: bool mask of its shape}`` for every parameter some unit spans."""
        if self._masks is None:
            masks: dict[str, Tensor] = {}
            for u in self.units:
                um = self.unit_masks[u.name]
                for name, dim in u.slices:
                    if name not in u.params:
                        continue
                    shape = self.params[name].shape
                    if dim < 0:
                        m = um.view(shape)
                    else:
                        view = [1] * len(shape)
                        view[dim] = u.size
                        m = um.view(view).expand(shape)
                    masks[name] = m & masks[name] if name in masks else m.clone()
            self._masks = masks
        return self._masks

    def set(self, unit_masks: Mapping[str, Tensor], fill: str | None = None,
            explored: bool = False) -> dict[str, Tensor]:  # fmt: skip
        """Make ``unit_masks`` current and return the newly active entries per parameter.

        Entries that become (or, after a reactivation -- ``explored`` -- stay) inactive have their live
        value stored and are zeroed.  Newly active entries get their stored value (``fill="restore"``),
        zero (``"zero"``), or keep their live value (``None``: IEE, what reactivation trained)."""
        old = self.param_masks()
        self.unit_masks = {u.name: unit_masks[u.name].to(self._device(u)).clone() for u in self.units}
        self._masks = None
        grown = {}
        with torch.no_grad():
            for name, m in self.param_masks().items():
                p, o, stash = self.params[name], old[name], self.stash[name]
                live = ~m if explored else ~m & o
                stash.copy_(torch.where(live, p, stash))
                g = m & ~o
                if fill == "restore":
                    p.copy_(torch.where(g, stash, p))
                elif fill == "zero":
                    p.masked_fill_(g, 0.0)
                p.masked_fill_(~m, 0.0)
                grown[name] = g
        return grown

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every inactive entry (after an optimizer step)."""
        for name, m in self.param_masks().items():
            self.params[name].masked_fill_(~m, 0.0)

    @torch.no_grad()
    def reactivate(self, init: str) -> None:
        """Bring the inactive entries back into the forward: their stored values (``"restore"``) or 0."""
        for name, m in self.param_masks().items():
            if init == "restore":
                p = self.params[name]
                p.copy_(torch.where(m, p, self.stash[name]))

    def inactive_count(self) -> int:
        return int(sum((~m).sum() for m in self.unit_masks.values()))

    def state_dict(self) -> dict:
        return {"unit_masks": dict(self.unit_masks), "stash": dict(self.stash)}

    def load_state_dict(self, state: Mapping) -> None:
        self.unit_masks = {k: v.to(self.unit_masks[k].device).bool() for k, v in state["unit_masks"].items()}
        for k, v in state["stash"].items():
            self.stash[k].copy_(v)
        self._masks = None


# ---------------------------------------------------------------------------------------------- decisions
def _top(scores: Tensor, where: Tensor, n: int, largest: bool = True) -> Tensor:
    """Indices of the ``n`` largest (smallest) ``scores`` among entries where ``where`` is True."""
    fill = -math.inf if largest else math.inf
    return torch.topk(scores.masked_fill(~where, fill), n, largest=largest).indices


def topk_mask(scores: Tensor, k: int) -> Tensor:
    m = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    m[torch.topk(scores, k).indices] = True
    return m


def swap_topk(scores: Tensor, mask: Tensor, k: int, cap: int) -> Tensor:
    """IEE's decision for one unit: the top-``k`` of ``scores`` over active and inactive entries alike,
    with at most ``cap`` swaps -- the best grown entries replace the worst active ones, so with no cap
    binding this IS the top-k set."""
    if int(mask.sum()) != k:
        return topk_mask(scores, k)
    grown = int((topk_mask(scores, k) & ~mask).sum())
    n = min(grown, cap)
    if n == 0:
        return mask.clone()
    new = mask.clone()
    new[_top(scores, mask, n, largest=False)] = False
    new[_top(scores, ~mask, n)] = True
    return new


def swap_rigl(keep: Tensor, grow: Tensor, mask: Tensor, n: int) -> Tensor:
    """RigL's decision: drop the ``n`` active entries of lowest ``keep``, grow the ``n`` inactive ones
    (those just dropped included) of highest ``grow``."""
    n = min(n, int(mask.sum()), int((~mask).sum()))
    if n <= 0:
        return mask.clone()
    new = mask.clone()
    new[_top(keep, mask, n, largest=False)] = False
    new[_top(grow, ~new, n)] = True
    return new


class ChannelBudget:
    """Selects channels of several groups under a MACs budget; ``macs(counts)`` is the MACs of the plain
    model keeping ``counts[g]`` channels of each group.  Every group keeps at least one channel."""

    def __init__(self, sizes: Mapping[str, int], macs: Callable[[dict[str, int]], float], budget: float) -> None:
        self.sizes, self.macs, self.budget = dict(sizes), macs, budget
        floor = self.macs(dict.fromkeys(sizes, 1))
        if floor > budget:
            raise ValueError(f"the MACs budget {budget:.4g} is below the smallest channel allocation ({floor:.4g} "
                             f"MACs with one channel per group); raise flops_target")  # fmt: skip

    @staticmethod
    def _ranked(scores: Mapping[str, Tensor], pick: Mapping[str, Tensor] | None = None,
                largest: bool = True) -> list[tuple[str, int]]:  # fmt: skip
        items = [(float(s[c]), g, c) for g, s in scores.items() for c in range(s.numel())
                 if pick is None or bool(pick[g][c])]  # fmt: skip
        items.sort(key=lambda t: (-t[0] if largest else t[0], t[1], t[2]))
        return [(g, c) for _, g, c in items]

    def fill(self, masks: dict[str, Tensor], order: list[tuple[str, int]]) -> None:
        """Add channels of ``order`` (in order) that still fit the budget."""
        counts = {g: int(m.sum()) for g, m in masks.items()}
        for g, c in order:
            if masks[g][c]:
                continue
            counts[g] += 1
            if self.macs(counts) <= self.budget:
                masks[g][c] = True
            else:
                counts[g] -= 1

    def trim(self, masks: dict[str, Tensor], order: list[tuple[str, int]]) -> None:
        """Remove channels of ``order`` (in order, skipping a group's last one) until within budget."""
        counts = {g: int(m.sum()) for g, m in masks.items()}
        for g, c in order:
            if self.macs(counts) <= self.budget:
                return
            if masks[g][c] and counts[g] > 1:
                masks[g][c] = False
                counts[g] -= 1

    def greedy(self, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The global ranking: each group's best channel, then channels by descending score while they fit."""
        masks = {g: torch.zeros(s.numel(), dtype=torch.bool) for g, s in scores.items()}
        for g, s in scores.items():
            masks[g][int(torch.argmax(s))] = True
        self.fill(masks, self._ranked(scores))
        return masks

    def swap_topk(self, scores: Mapping[str, Tensor], old: Mapping[str, Tensor], cap: int) -> dict[str, Tensor]:
        """IEE over channels: the budgeted global ranking ``A*`` of ``scores``; grow at most ``cap`` of
        ``A*``'s new channels (best first), drop the worst active channels outside ``A*`` (then any) until
        within budget, then fill with ``A*``'s remaining channels that fit."""
        old = {g: m.cpu() for g, m in old.items()}
        star = self.greedy(scores)
        new = {g: m.clone() for g, m in old.items()}
        for g, c in self._ranked(scores, {g: star[g] & ~old[g] for g in old})[:cap]:
            new[g][c] = True
        out_of_star = self._ranked(scores, {g: old[g] & ~star[g] for g in old}, largest=False)
        self.trim(new, out_of_star + self._ranked(scores, new, largest=False))
        self.fill(new, self._ranked(scores, star))
        return new

    def swap_rigl(self, keep: Mapping[str, Tensor], grow: Mapping[str, Tensor], old: Mapping[str, Tensor],
                  n: int) -> dict[str, Tensor]:  # fmt: skip
        """RigL over channels: drop the ``n`` active channels of lowest ``keep`` (not a group's last),
        then grow inactive channels by descending ``grow`` while they fit the budget."""
        new = {g: m.cpu().clone() for g, m in old.items()}
        counts = {g: int(m.sum()) for g, m in new.items()}
        dropped = 0
        for g, c in self._ranked(keep, new, largest=False):
            if dropped >= n:
                break
            if counts[g] > 1:
                new[g][c], counts[g], dropped = False, counts[g] - 1, dropped + 1
        self.trim(new, self._ranked(keep, new, largest=False))
        self.fill(new, self._ranked(grow, {g: ~m for g, m in new.items()}))
        return new


def normalize_by_set(scores: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each unit's scores divided by the mean score of their set -- the active entries by the active ones',
    the reactivated ones by the reactivated ones' -- so an entry is ranked by how it compares with the
    entries trained as long as itself (ALGORITHMS.md gotcha 11: age-fair ranking of prune and grow)."""
    out = {}
    for g, s in scores.items():
        s = s.float().clone()
        m = masks[g].to(s.device)
        for part in (m, ~m):
            if part.any():
                s[part] = s[part] / s[part].mean().clamp_min(1e-30)
        out[g] = s
    return out


def normalize_scores(scores: Mapping[str, Tensor], how: str) -> dict[str, Tensor]:
    """Channel scores comparable across groups: ``"mean"`` divides each group's by its mean, ``"none"``."""
    if how == "none":
        return {g: s.float().cpu() for g, s in scores.items()}
    return {g: (s.float() / s.float().mean().clamp_min(1e-30)).cpu() for g, s in scores.items()}


# ---------------------------------------------------------------------------------------------- optimizer
class MaskedSGD(torch.optim.Optimizer):
    """SGD (momentum, nesterov, L2 weight decay as in ``torch.optim.SGD``) whose step touches only the
    entries allowed by ``update_masks`` (set before :meth:`step`: ``{param: bool tensor | bool}``;
    absent = all).  A disallowed entry keeps its value bit for bit, gets no weight decay, and its
    momentum buffer is left as it is (ALGORITHMS.md gotcha 9: zero grads alone do not freeze a
    parameter under momentum or weight decay)."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:  # fmt: skip
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay})
        self.update_masks: dict[Tensor, Tensor | bool] = {}

    @torch.no_grad()
    def step(self, closure=None):  # torch.optim signature; no closure support
        for group in self.param_groups:
            lr, mom, wd, nesterov = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
            for p in group["params"]:
                allow = self.update_masks.get(p, True)
                if allow is False or (p.grad is None and not wd):
                    continue
                d = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                if wd:
                    d.add_(p, alpha=wd)
                if mom:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.zeros_like(p)
                    new_buf = buf * mom + d
                    d = d + mom * new_buf if nesterov else new_buf
                    buf.copy_(new_buf if allow is True else torch.where(allow, new_buf, buf))
                if allow is True:
                    p.add_(d, alpha=-lr)
                else:
                    p.copy_(torch.where(allow, p - lr * d, p))
        return None

    @torch.no_grad()
    def reset_momentum(self, p: Tensor, where: Tensor) -> None:
        """Zero the momentum of ``p`` at ``where`` (grown or pruned entries)."""
        buf = self.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            buf.masked_fill_(where, 0.0)
