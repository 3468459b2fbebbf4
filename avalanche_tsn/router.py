"""A learned task router: which trained task a sample belongs to, from the frozen subnetworks.

TinySubNets (Zurek et al., arXiv:2412.10869, 2024) never forgets within a task; on a
class-incremental stream its accuracy rests on inferring each test sample's task. Mask-based
class-incremental methods do best when the task-identification part is trained, not scored
after the fact (HAT+CSI, MORE and ROW, Kim et al., 2022-2023; TPL, Lin et al., ICLR 2024).
This router follows them within TSN's guarantee:

- it reads each trained task's features (the heads' input under that task's frozen
  subnetwork), standardised by the statistics of that task's own samples;
- each task's features go through a small projection of their own (``hidden`` units per
  task, so the router grows linearly with the tasks), and one linear layer over all the
  projections scores the tasks (a softmax over tasks: each task's "mine" evidence is
  weighed against every other task's, as ROW's per-task out-of-distribution heads are);
- it is fitted again from scratch after every task on the task memory (the samples TSN
  keeps of each earlier task, with noisy copies of them: :func:`noisy_copies`) plus the new
  task's training data, each task weighted equally.

The subnetworks themselves are never touched: the router only chooses among their outputs,
so every task's own predictions stay bit-identical. While a task trains, its subnetwork can
also learn to be unsure on the earlier tasks' memory samples (outlier exposure, Hendrycks
et al., ICLR 2019; :func:`outlier_exposure_loss`), which makes its features separate its
own samples from theirs (MORE's use of the memory as out-of-distribution data).

Measured on split digits and split Fashion-MNIST without task labels against the
nearest-memory rule and Avalanche's rehearsal methods at equal memory (BENCHMARKS.md,
"Class-incremental at equal memory"; ``benchmarks/class_incremental.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avalanche_tsn.validation import check_float, check_int

__all__ = [
    "TaskRouter",
    "RouterSettings",
    "noisy_copies",
    "fit_samples",
    "outlier_exposure_loss",
    "DEFAULT_OOD_WEIGHT",
    "check_ood_weight",
]

#: Default weight of the outlier-exposure loss while a task trains with the router. Measured
#: once per weight, seed 0, this router fitted on the final tasks' features: split digits 0
#: gives 93.3% of test samples routed right, 0.5 96.7%, 2.0 95.8% (with a lower within-task
#: accuracy); split Fashion-MNIST 79.0%, 81.3%, 77.1%.
DEFAULT_OOD_WEIGHT = 0.5


def check_ood_weight(value: object) -> float:
    """``value`` if it is a finite float >= 0 (an infinite weight makes every loss nan).

    :param value: the outlier-exposure weight.
    """
    return check_float(value, "ood_weight", 0, math.inf, high_open=True)


#: the router's learned buffers (``labels`` names the tasks they are for)
_BUFFERS = ("labels", "mean", "std", "proj_w", "proj_b", "out_w", "out_b")


class RouterSettings:
    """How a :class:`TaskRouter` is fitted (checked on construction).

    :param hidden: projection units per task, >= 1.
    :param steps: full-batch Adam steps per fit, >= 1.
    :param lr: Adam's learning rate, > 0.
    :param weight_decay: Adam's weight decay, >= 0.
    :param seed: seed of the initial weights and of the memory's noisy copies.
    :param copies: noisy copies of each earlier task's memory sample added to the fit, >= 0
        (the memory itself is kept; see :func:`noisy_copies`).
    :param noise: the copies' Gaussian noise, times the memory's own standard deviation,
        >= 0.
    """

    def __init__(
        self,
        hidden: int = 8,
        steps: int = 300,
        lr: float = 3e-3,
        weight_decay: float = 1e-2,
        seed: int = 0,
        copies: int = 8,
        noise: float = 0.5,
    ) -> None:
        self.hidden = check_int(hidden, "router hidden", 1)
        self.steps = check_int(steps, "router steps", 1)
        self.lr = check_float(lr, "router lr", 0, math.inf, low_open=True, high_open=True)
        self.weight_decay = check_float(
            weight_decay, "router weight_decay", 0, math.inf, high_open=True
        )
        self.seed = check_int(seed, "router seed")
        self.copies = check_int(copies, "router copies", 0)
        self.noise = check_float(noise, "router noise", 0, math.inf, high_open=True)


class TaskRouter(nn.Module):
    """Scores which trained task a sample belongs to; fitted after each task.

    Everything it learns is a buffer (in ``state_dict``, never in a training optimizer).
    An unfitted router routes nothing (:meth:`fitted_tasks` is empty).
    """

    labels: Tensor
    mean: Tensor
    std: Tensor
    proj_w: Tensor
    proj_b: Tensor
    out_w: Tensor
    out_b: Tensor

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long, device=device))
        for name in _BUFFERS[1:]:
            self.register_buffer(name, torch.zeros(0, device=device))

    def fitted_tasks(self) -> list[int]:
        """The task labels the router was last fitted for, in score order."""
        return self.labels.tolist()

    def bits(self) -> int:
        """Bits the router stores (float32 weights and statistics; labels not counted)."""
        return 32 * sum(getattr(self, n).numel() for n in _BUFFERS[1:])

    def scores(self, features: Sequence[Tensor]) -> Tensor:
        """Each sample's score for each fitted task, ``[n, tasks]`` (higher: more likely).

        :param features: each fitted task's features of the same samples, ``[n, d]``, in the
            order of :meth:`fitted_tasks`.
        """
        if len(features) != len(self.labels) or not len(features):
            raise ValueError(
                f"the router scores tasks {self.fitted_tasks()}: pass one feature tensor per "
                f"task, got {len(features)}"
            )
        w = self._weights()
        z = [(f.float() - m) / s for f, m, s in zip(features, w["mean"], w["std"], strict=True)]
        return _logits(w, z)

    @torch.no_grad()
    def fit(
        self,
        features: Sequence[Tensor],
        targets: Tensor,
        labels: Sequence[int],
        settings: RouterSettings | None = None,
    ) -> None:
        """Fit the router from scratch: ``targets[i]`` is the index in ``labels`` of sample i.

        Every argument is checked before the router changes; each task weighs the same in
        the loss whatever its sample count.

        :param features: each task's features of the same ``n`` samples, ``[n, d]``.
        :param targets: the index (in ``labels``) of each sample's task, ``[n]``.
        :param labels: the task labels, one per feature tensor.
        :param settings: how to fit (default :class:`RouterSettings`).
        """
        settings = settings or RouterSettings()
        n_tasks = len(labels)
        _check_fit(features, targets, n_tasks)
        counts = torch.bincount(targets, minlength=n_tasks)
        feats = [f.detach().float() for f in features]
        own = [feats[t][targets == t] for t in range(n_tasks)]
        mean = torch.stack([o.mean(0) for o in own])
        # a floor keeps dead features (zero spread) from dividing by zero
        std = torch.stack([o.std(0) for o in own]) + 1e-3
        z = [(f - m) / s for f, m, s in zip(feats, mean, std, strict=True)]
        weights = _initial(n_tasks, z[0].shape[1], settings, z[0].device)
        balance = (counts.sum() / (n_tasks * counts)).float()
        with torch.enable_grad():
            for w in weights.values():
                w.requires_grad_(True)
            opt = torch.optim.Adam(
                weights.values(), lr=settings.lr, weight_decay=settings.weight_decay
            )
            for _ in range(settings.steps):
                opt.zero_grad()
                F.cross_entropy(_logits(weights, z), targets, balance).backward()
                opt.step()
        learned = {k: w.detach() for k, w in weights.items()}
        self.labels = torch.tensor(list(labels), dtype=torch.long, device=self.labels.device)
        self.mean, self.std = mean.to(self.labels.device), std.to(self.labels.device)
        for name, value in learned.items():
            setattr(self, name, value.to(self.labels.device))

    def learned(self) -> dict[str, Tensor]:
        """The fitted statistics and weights by name (what an export file stores)."""
        return self._weights()

    def restore(self, labels: Sequence[int], learned: dict[str, Tensor]) -> None:
        """Put back a fitted router (from :meth:`learned` and :meth:`fitted_tasks`).

        :param labels: the task labels it was fitted for.
        :param learned: its statistics and weights by name.
        """
        n, names = len(labels), set(_BUFFERS[1:])
        if set(learned) != names:
            raise ValueError(f"learned must hold exactly {sorted(names)}, got {sorted(learned)}")
        d = learned["mean"].shape[-1] if learned["mean"].dim() == 2 else -1
        h = learned["proj_b"].shape[-1] if learned["proj_b"].dim() == 2 else -1
        expected = {
            "mean": (n, d), "std": (n, d), "proj_w": (n, h, d), "proj_b": (n, h),
            "out_w": (n, n * h), "out_b": (n,),
        }  # fmt: skip
        if n < 1 or any(tuple(learned[k].shape) != v for k, v in expected.items()):
            shapes = {k: tuple(v.shape) for k, v in learned.items()}
            raise ValueError(f"a router for {n} tasks has shapes {expected}, got {shapes}")
        device = self.labels.device
        self.labels = torch.tensor(list(labels), dtype=torch.long, device=device)
        for name, value in learned.items():
            setattr(self, name, value.detach().to(device, torch.float32).clone())

    def _weights(self) -> dict[str, Tensor]:
        return {n: getattr(self, n) for n in _BUFFERS[1:]}

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The buffers' shapes follow the tasks fitted; a state dict from before the router
        # (0.5 and older) has none of them and leaves the router unfitted.
        for name in _BUFFERS:
            value = state_dict.get(prefix + name)
            if value is not None:
                current = getattr(self, name)
                setattr(self, name, value.detach().to(current.device, current.dtype).clone())


def _check_fit(features: Sequence[Tensor], targets: Tensor, n_tasks: int) -> None:
    if n_tasks < 1 or len(features) != n_tasks:
        raise ValueError(
            f"features must hold one tensor per task label ({n_tasks}), got {len(features)}"
        )
    if targets.dim() != 1 or targets.dtype != torch.long:
        raise ValueError(f"targets must be a 1-d long tensor, got {targets.dtype} {targets.shape}")
    shapes = {tuple(f.shape) for f in features}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or features[0].shape[0] != len(targets):
        raise ValueError(
            f"features must all be [n, d] with n = len(targets) = {len(targets)}, got {shapes}"
        )
    if bool((targets < 0).any()) or bool((targets >= n_tasks).any()):
        raise ValueError(f"targets must lie in [0, {n_tasks}), got {targets.unique().tolist()}")
    counts = torch.bincount(targets, minlength=n_tasks)
    if bool((counts < 2).any()):
        got = counts.tolist()
        raise ValueError(f"every task needs at least 2 samples to fit the router, got {got}")


def _initial(n_tasks: int, dim: int, s: RouterSettings, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(s.seed)

    def uniform(*shape: int, fan_in: int) -> Tensor:
        # nn.Linear's default range, drawn from a private generator
        bound = fan_in**-0.5
        return ((torch.rand(*shape, generator=g) * 2 - 1) * bound).to(device)

    h = s.hidden
    return {
        "proj_w": uniform(n_tasks, h, dim, fan_in=dim),
        "proj_b": uniform(n_tasks, h, fan_in=dim),
        "out_w": uniform(n_tasks, n_tasks * h, fan_in=n_tasks * h),
        "out_b": uniform(n_tasks, fan_in=n_tasks * h),
    }


def _logits(w: dict[str, Tensor], standardised: Sequence[Tensor]) -> Tensor:
    z = torch.stack(list(standardised))  # [tasks, n, d]
    hidden = torch.relu(torch.einsum("tnd,thd->nth", z, w["proj_w"]) + w["proj_b"])
    return hidden.flatten(1) @ w["out_w"].T + w["out_b"]


def noisy_copies(memory: Tensor, copies: int, noise: float, generator: torch.Generator) -> Tensor:
    """``memory`` followed by ``copies`` copies of it with Gaussian noise added.

    An earlier task is known to the router by its memory alone (100 samples by default)
    against the new task's whole training set; noisy copies of the memory, run through every
    subnetwork, keep the router from fitting those few samples' features exactly (measured:
    BENCHMARKS.md, "Class-incremental at equal memory"). Nothing more is stored.

    Integer samples (token ids) have no nearby values to add noise toward: their copies are
    exact, which still gives the memory its weight in the fit.

    :param memory: one task's memory samples, ``[n, ...]``.
    :param copies: noisy copies to add (0: ``memory`` as it is).
    :param noise: the noise's standard deviation, times that of ``memory``'s values.
    :param generator: a CPU generator (the noise is drawn on the CPU, then moved).
    """
    if copies == 0 or len(memory) == 0:
        return memory
    if not memory.is_floating_point():
        return memory.repeat(copies + 1, *([1] * (memory.dim() - 1)))
    scale = noise * float(memory.float().std()) if memory.numel() > 1 else 0.0
    draws = torch.randn((copies, *memory.shape), generator=generator)
    noisy = memory.unsqueeze(0) + (scale * draws).to(memory.device, memory.dtype)
    return torch.cat([memory, noisy.flatten(0, 1)])


def fit_samples(
    samples: Sequence[Tensor], memories: Sequence[bool], settings: RouterSettings
) -> tuple[Tensor, Tensor]:
    """The samples a router is fitted on and each one's task index, in the order given.

    Each memory gets ``settings.copies`` noisy copies (:func:`noisy_copies`, drawn in order
    from one generator seeded by ``settings.seed``); other tasks' samples enter as they are.

    :param samples: each task's samples, ``[n_t, ...]``, in the router's task order.
    :param memories: for each task, whether its samples are a task memory.
    :param settings: the router's settings.
    """
    if len(samples) != len(memories):
        raise ValueError(f"one memories flag per task: {len(samples)} tasks, {len(memories)}")
    g = torch.Generator().manual_seed(settings.seed)
    xs = [
        noisy_copies(x, settings.copies, settings.noise, g) if memory else x
        for x, memory in zip(samples, memories, strict=True)
    ]
    targets = torch.cat([torch.full((len(x),), i, dtype=torch.long) for i, x in enumerate(xs)])
    return torch.cat([x.to(xs[0].device) for x in xs]), targets


def outlier_exposure_loss(outputs: Tensor) -> Tensor:
    """Cross-entropy of ``outputs`` against the uniform distribution over their classes.

    Added while a task trains on the earlier tasks' memory samples run through its
    subnetwork, it teaches that subnetwork to be unsure on what is not its own.

    :param outputs: logits of out-of-task samples, ``[n, classes]``.
    """
    return -torch.log_softmax(outputs, dim=1).mean()
