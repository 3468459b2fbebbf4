"""Compatibility fixes between Avalanche 0.6 and the torch versions it runs on."""

from __future__ import annotations

import sys

import torch.optim

__all__ = ["expose_optimizer_modules"]


def expose_optimizer_modules() -> None:
    """Put back the submodule names ``torch.optim`` deletes (``torch.optim.sgd``...).

    Without them dill cannot find optimizer classes by reference, pickles them by value and
    fails, so Avalanche's ``save_checkpoint`` breaks for every strategy.
    """
    for name, module in list(sys.modules.items()):
        parent, _, short = name.rpartition(".")
        if parent == "torch.optim" and module is not None and not hasattr(torch.optim, short):
            setattr(torch.optim, short, module)
