"""Task similarity: KL divergence between tasks and the choice of a backbone copy (bank).

TinySubNets (Zurek et al., arXiv:2412.10869, 2024), step 5 and appendix Eq. 7: a small memory
of each task's samples lets TSN measure how unlike the earlier tasks a new task is; a task too
unlike every earlier one gets a fresh copy of the backbone (a bank) instead of sharing.

The divergence of a new task ``n`` from an earlier task ``t`` is measured in the feature space
of ``t``'s own frozen subnetwork (the input of the heads, or of the last maskable layer): a
diagonal Gaussian is fitted to the features of ``t``'s memory samples and one to the features
of ``n``'s samples, and

    D(n || t) = (1/d) * sum_j KL( N(mu_nj, var_nj) || N(mu_tj, var_tj) )

the per-feature KL divergence averaged over the ``d`` features, in nats. It is 0 for the same
distribution, grows with the shift between them, and does not depend on the layer width.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from avalanche_tsn.router import TaskRouter
from avalanche_tsn.validation import check_float


class TSNModel(Protocol):
    """What task similarity and task inference read of a TSN model.

    :class:`avalanche_tsn.model.TSNModel` has it; the model runs task inference through these
    modules, so they name what they use rather than import the model (one import direction).
    """

    training: bool
    task_table: nn.Module
    task_router: TaskRouter

    def __call__(self, x: Tensor, task_labels: int) -> Tensor: ...

    def train(self, mode: bool = True) -> nn.Module: ...

    def eval(self) -> nn.Module: ...

    def trained_tasks(self) -> list[int]: ...

    def memory(self, task_label: int) -> Tensor: ...

    def classifier_heads(self) -> list[nn.Module]: ...

    def routed_layers(self) -> list[nn.Module]: ...


#: Default ``kl_threshold``: above the closest-task divergence of every task measured on permuted
#: digits, split and permuted Fashion-MNIST (at most 1.15), so such streams keep one bank (see
#: the README, "Task matching").
DEFAULT_KL_THRESHOLD = 1.5

__all__ = [
    "DEFAULT_KL_THRESHOLD",
    "gaussian_kl",
    "task_features",
    "feature_module",
    "task_divergence",
    "choose_bank",
    "check_threshold",
]


def check_threshold(value: object, name: str = "kl_threshold") -> float:
    """Validate a divergence threshold (a float >= 0; ``inf`` never opens a bank).

    :param value: the threshold.
    :param name: the argument name used in the error message.
    """
    return check_float(value, name, 0)


def gaussian_kl(p: Tensor, q: Tensor, floor: float = 1e-3) -> float:
    """Mean per-feature KL(N_p || N_q) between diagonal Gaussians fitted to two samples.

    :param p: samples of the first distribution, ``[n, d]``.
    :param q: samples of the second distribution, ``[m, d]``.
    :param floor: variances are floored at ``floor`` times the mean variance of ``q`` (dead
        features, e.g. ReLU units that never fire, have zero variance).
    """
    if p.dim() != 2 or q.dim() != 2 or p.shape[1] != q.shape[1]:
        raise ValueError(f"p and q must be [n, d] with the same d, got {p.shape} and {q.shape}")
    if len(p) < 2 or len(q) < 2:
        raise ValueError("gaussian_kl needs at least 2 samples on each side")
    p, q = p.double(), q.double()
    mu_p, mu_q = p.mean(0), q.mean(0)
    eps = floor * float(q.var(0).mean()) + 1e-12
    var_p, var_q = p.var(0) + eps, q.var(0) + eps
    kl = 0.5 * (torch.log(var_q / var_p) + (var_p + (mu_p - mu_q) ** 2) / var_q - 1.0)
    return float(kl.mean())


def feature_module(model: TSNModel) -> nn.Module:
    """The module whose input is a task's features: the first head, else the last masked layer.

    :param model: the TSN model.
    """
    heads = model.classifier_heads()
    if heads:
        return heads[0]
    return model.routed_layers()[-1]


@torch.no_grad()
def task_features(model: TSNModel, task_label: int, x: Tensor, batch_size: int = 256) -> Tensor:
    """Features of ``x`` under ``task_label``'s subnetwork (input of the heads), ``[n, d]``.

    :param model: the TSN model.
    :param task_label: the task whose subnetwork runs.
    :param x: input samples.
    :param batch_size: samples per forward.
    """
    captured: list[Tensor] = []
    hook = feature_module(model).register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].flatten(1).detach())
    )
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size], int(task_label))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured)


def task_divergence(model: TSNModel, new_x: Tensor, task_label: int) -> float:
    """D(new || task_label): how unlike task ``task_label`` the samples ``new_x`` are.

    :param model: the TSN model; ``task_label`` must be trained and have a memory.
    :param new_x: samples of the new task.
    :param task_label: an earlier task.
    """
    memory = model.memory(task_label).to(new_x.device)
    if len(memory) < 2:
        raise ValueError(f"task {task_label} has fewer than 2 memory samples")
    old = task_features(model, task_label, memory)
    new = task_features(model, task_label, new_x)
    return gaussian_kl(new, old)


def choose_bank(
    divergences: dict[int, float], banks: dict[int, int], threshold: float, n_banks: int
) -> int:
    """The bank of a new task: its closest task's, or a new one if all are too far.

    :param divergences: divergence of the new task from each earlier task.
    :param banks: bank of each earlier task.
    :param threshold: largest divergence at which the new task still shares.
    :param n_banks: banks open so far (the index of a new one).
    """
    if not divergences:
        return 0
    closest = min(divergences, key=divergences.__getitem__)
    return banks[closest] if divergences[closest] <= threshold else n_banks
