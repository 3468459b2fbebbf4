"""Small seeded streams and models shared by the tests."""

from __future__ import annotations

import warnings

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from torch import nn

from avalanche_tsn.datasets import TensorTaskDataset, task_stream


def blob_stream(
    n_tasks: int = 3,
    n_classes: int = 3,
    dim: int = 12,
    n: int = 96,
    seed: int = 0,
    task_labels: bool = True,
    poison: dict[int, float] | None = None,
):
    """Gaussian blobs; each task draws its own class centres (a different problem per task).

    ``poison={i: value}`` writes ``value`` (NaN, inf...) into one training input of task ``i``.
    """
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for _ in range(n_tasks):
        centres = torch.randn(n_classes, dim, generator=g) * 2.0
        parts = []
        for size in (n, n // 2):
            y = torch.arange(size) % n_classes
            x = centres[y] + 0.5 * torch.randn(size, dim, generator=g)
            if poison and len(train) in poison and size == n:
                x[3, 0] = poison[len(train)]
            parts.append(TensorTaskDataset(x, y))
        train.append(parts[0])
        test.append(parts[1])
    return task_stream(train, test, task_labels=task_labels)


def token_stream(
    n_tasks: int = 3, n_classes: int = 3, vocab: int = 40, length: int = 10, n: int = 96,
    seed: int = 0, class_incremental: bool = False,
):  # fmt: skip
    """Sequences of token ids (int64, 0 is padding); each class of each task favours its own
    tokens, and each sequence ends in 0 to 3 padding tokens. ``class_incremental``: global
    class ids (task t's classes follow task t-1's) and every experience task label 0."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for t in range(n_tasks):
        favoured = torch.randint(1, vocab, (n_classes, 4), generator=g)
        parts = []
        for size in (n, n // 2):
            y = torch.arange(size) % n_classes
            pick = torch.randint(0, 4, (size, length), generator=g)
            noise = torch.randint(1, vocab, (size, length), generator=g)
            x = torch.where(
                torch.rand(size, length, generator=g) < 0.6, favoured[y[:, None], pick], noise
            )
            pad = torch.randint(0, 4, (size, 1), generator=g)
            x[torch.arange(length) >= length - pad] = 0
            parts.append(TensorTaskDataset(x, y + t * n_classes if class_incremental else y))
        train.append(parts[0])
        test.append(parts[1])
    if class_incremental:
        return nc_benchmark(
            train, test, n_experiences=n_tasks, task_labels=False, shuffle=False,
            one_dataset_per_exp=True,
        )  # fmt: skip
    return task_stream(train, test)


class TokenBag(nn.Module):
    """Token ids looked up in an embedding table (0 is padding), averaged, then an MLP."""

    def __init__(self, vocab: int = 40, out: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(x).mean(1))


class TextConv(nn.Module):
    """A small TextCNN: embeddings, a 1-d convolution over the sequence, max over time."""

    def __init__(self, vocab: int = 40, out: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8, scale_grad_by_freq=True)
        self.conv = nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.embed(x).transpose(1, 2)).amax(2))


def mlp(dim: int = 12, hidden: int = 16, out: int = 3, bias: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Linear(dim, hidden, bias=bias),
        nn.ReLU(),
        nn.Linear(hidden, hidden, bias=bias),
        nn.ReLU(),
        nn.Linear(hidden, out, bias=bias),
    )


def sloped_mlp(dim: int = 12, hidden: int = 16, out: int = 3) -> nn.Module:
    """:func:`mlp` with PReLU (a slope per unit, then one slope) in place of its ReLUs."""
    return nn.Sequential(
        nn.Linear(dim, hidden),
        nn.PReLU(hidden),
        nn.Linear(hidden, hidden),
        nn.PReLU(),
        nn.Linear(hidden, out),
    )


def normed_mlp(dim: int = 12, hidden: int = 16, out: int = 3) -> nn.Module:
    """:func:`mlp` with LayerNorm (one with a bias, one without) after its hidden layers."""
    return nn.Sequential(
        nn.Linear(dim, hidden),
        nn.LayerNorm(hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.LayerNorm(hidden, bias=False),
        nn.ReLU(),
        nn.Linear(hidden, out),
    )


class SmallConvNet(nn.Module):
    """A conv backbone with BatchNorm (or GroupNorm), for 1x4x4 inputs made from 16-dim
    vectors."""

    def __init__(self, out: int = 3, group_norm: bool = False) -> None:
        super().__init__()
        norm = (lambda c: nn.GroupNorm(2, c)) if group_norm else nn.BatchNorm2d
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            norm(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, bias=False),
            norm(4),
            nn.ReLU(),
        )
        self.head = nn.Linear(4 * 16, out)

    def forward(self, x):
        x = x.view(-1, 1, 4, 4)
        return self.head(self.features(x).flatten(1))


class Signal1d(nn.Module):
    """16-dim vectors read as 2 channels of 8 steps: 1-d convolutions, zero and circular padding."""

    def __init__(self, out: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(2, 8, 3, padding=1),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Conv1d(8, 8, 3, padding=1, padding_mode="circular", bias=False),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Conv1d(8, 8, 2, stride=2),
        )
        self.head = nn.Linear(8 * 4, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 2, 8)).flatten(1))


class Volume3d(nn.Module):
    """16-dim vectors read as one 2x2x4 volume: 3-d convolutions, zero and replicate padding."""

    def __init__(self, out: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(1, 4, 3, padding=1),
            nn.BatchNorm3d(4),
            nn.ReLU(),
            nn.Conv3d(4, 4, (1, 2, 3), padding="same", padding_mode="replicate", bias=False),
            nn.ReLU(),
        )
        self.head = nn.Linear(4 * 16, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 2, 2, 4)).flatten(1))


def pytest_configure(config):
    # Avalanche's loss metric calls float() on the strategy's loss, which requires grad; torch
    # 2.14 warns of that (code we do not own; the value is right)
    config.addinivalue_line(
        "filterwarnings",
        "ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning",
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _keep_the_warning_filters(monkeypatch):
    """Keep pyproject's filters in force: Avalanche's ``@deprecated`` wrapper calls
    ``warnings.simplefilter("once", DeprecationWarning)`` on every call, which puts its own
    filter in front of them, and its replay plugins call deprecated functions of their own
    (``storage_policy.update``), code we do not own."""
    real = warnings.simplefilter

    def simplefilter(action, category=Warning, *args, **kwargs):
        if action == "once" and category is DeprecationWarning:
            return None
        return real(action, category, *args, **kwargs)

    monkeypatch.setattr(warnings, "simplefilter", simplefilter)


def quiet_evaluator():
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    return EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])


def adam_strategy(model: nn.Module, cls=None, **kw):
    """A TSN-family strategy (TSNStrategy by default) with Adam 1e-2, minibatch 16, 2 epochs."""
    from avalanche_tsn import TSNStrategy

    return (cls or TSNStrategy)(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        train_mb_size=16,
        train_epochs=2,
        evaluator=quiet_evaluator(),
        **kw,
    )


def image_stream(
    n_tasks: int, side: int, sizes: tuple[int, int], spread: float, noise: float, seed: int = 0
):
    """3-class 3 x side x side image blobs, ``sizes`` (train, test) samples a task."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for _ in range(n_tasks):
        centres = torch.randn(3, 3, side, side, generator=g) * spread
        parts = []
        for size in sizes:
            y = torch.arange(size) % 3
            x = centres[y] + noise * torch.randn(size, 3, side, side, generator=g)
            parts.append(TensorTaskDataset(x, y))
        train.append(parts[0])
        test.append(parts[1])
    return task_stream(train, test)


def compression_outcome(strategy, bm) -> tuple[list, dict, list[torch.Tensor]]:
    """What pruning and quantization decided, and every trained task's outputs for all the
    test samples of ``bm``."""
    prune = next(p for p in strategy.plugins if type(p).__name__ == "PruningPlugin")
    quant = next(p for p in strategy.plugins if type(p).__name__ == "QuantizationPlugin")
    data = [exp.dataset for exp in bm.test_stream]
    x = torch.stack([d[i][0] for d in data for i in range(len(d))])
    with torch.no_grad():
        outputs = [strategy.model(x, t) for t in sorted(strategy.model.trained_tasks())]
    return prune.records, quant.bits, outputs


def same_outcome(a: tuple, b: tuple) -> bool:
    """Whether two :func:`compression_outcome` results are equal (outputs bit for bit)."""
    return a[0] == b[0] and a[1] == b[1] and all(map(torch.equal, a[2], b[2]))


def train_tsn(model=None, tasks: int = 3, dim: int = 12, **kw):
    """Train a TSNStrategy (Adam, 2 epochs) on a blob stream; returns it and the stream."""
    bm = blob_stream(n_tasks=tasks, dim=dim)
    strategy = adam_strategy(model if model is not None else mlp(dim), **kw)
    strategy.train(bm.train_stream, eval_streams=[])
    return strategy, bm


def fast_benchmark(task_labels: bool = True, seed: int = 1234, n_per_class: int = 100):
    """Avalanche's own fast test benchmark: 10 classes of 6 features, 5 experiences of 2."""
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    x, y = make_classification(
        n_samples=10 * n_per_class,
        n_classes=10,
        n_features=6,
        n_informative=6,
        n_redundant=0,
        random_state=seed,
    )
    x, y = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, train_size=0.6, shuffle=True, stratify=y, random_state=seed
    )
    return nc_benchmark(
        _make_taskaware_tensor_classification_dataset(x_tr, y_tr),
        _make_taskaware_tensor_classification_dataset(x_te, y_te),
        5,
        task_labels=task_labels,
        shuffle=True,
        seed=seed,
    )


def collate_dicts(items: list[dict]) -> dict[str, torch.Tensor]:
    """Collate samples that are dictionaries (Avalanche's dictionary-minibatch tests)."""
    return {k: torch.stack([torch.as_tensor(d[k]) for d in items]) for k in items[0]}


class DictMinibatches:
    """Avalanche's own dictionary-minibatch strategy parts (mix in before the strategy)."""

    @property
    def mb_x(self):
        return self.mbatch["x"]

    @property
    def mb_y(self):
        return self.mbatch["y"]

    @property
    def mb_task_id(self):
        return self.mbatch["targets_task_labels"]

    def _unpack_minibatch(self):
        for k in self.mbatch:
            self.mbatch[k] = self.mbatch[k].to(self.device)
