"""Write the 0.4 regression fixtures: trained state dicts, their export files, their reports.

Run from ``tests/``: ``PYTHONPATH=. python data/make_v0_4_fixtures.py``. The files were written by
avalanche-tsn 0.4.1 (export format 2); ``test_export.py`` checks that today's code reads the
state dicts and writes the very same bytes, so a refactoring cannot change the format.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import SmallConvNet, train_tsn

from avalanche_tsn.models import MultiHeadMLP

HERE = Path(__file__).parent

#: name: (architecture, input dim, training keywords); banks [0, 0, 1, 1] and quantized heads
#: and task memory for the MLP, normalisation layers for the convolutional net
FIXTURES = {
    "mlp": (
        lambda: MultiHeadMLP(12, (16, 16), 3, bias=True),
        12,
        {"new_bank_below": 0.7, "task_inference": "memory", "memory_size": 8},
    ),
    "conv": (SmallConvNet, 16, {}),
}


def main() -> None:
    sizes = {}
    for name, (make, dim, kw) in FIXTURES.items():
        torch.manual_seed(0)
        strategy, _ = train_tsn(make(), tasks=4, dim=dim, **kw)
        torch.save(strategy.model.state_dict(), HERE / f"v0_4_{name}_state_dict.pt")
        strategy.export(HERE / f"v0_4_{name}_export.tsn")
        sizes[name] = strategy.capacity_report().total_bits
    (HERE / "v0_4_capacity_bits.json").write_text(json.dumps(sizes, indent=1) + "\n")


if __name__ == "__main__":
    main()
