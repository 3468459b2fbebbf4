"""Drop-in, second pass (issue 25): pipelines that run with Naive run with TSN, or TSN
refuses them up front with a message that names what to change; what TSN learned is kept."""

from __future__ import annotations

import pytest
import torch
from avalanche.training import Naive
from conftest import blob_stream, mlp, quiet_evaluator
from torch import nn

from avalanche_tsn import TSNModel, TSNStrategy


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# 3: TSNModel(nn.BatchNorm2d(10)) was accepted with nothing to mask
@pytest.mark.parametrize(
    "make", [lambda: nn.BatchNorm2d(10), lambda: nn.Sequential(nn.BatchNorm2d(10))]
)
def test_a_model_of_normalisation_only_is_refused_the_same_way(make):
    with pytest.raises(ValueError, match="no maskable layer"):
        TSNModel(make())


def _adam(cls, model, **kw):
    return cls(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        train_mb_size=16,
        train_epochs=1,
        evaluator=quiet_evaluator(),
        **kw,
    )


# 4: retraining a trained task named the internal slot and gave the wrong hint
def test_training_a_learned_experience_again_names_it_and_the_ways_out():
    bm = blob_stream(n_tasks=2)
    naive = _adam(Naive, mlp())
    naive.train(bm.train_stream[0])
    naive.train(bm.train_stream[0])  # Naive trains it again
    strategy = _adam(TSNStrategy, mlp())
    strategy.train(bm.train_stream[0], eval_streams=[])
    second = _adam(TSNStrategy, strategy.model)  # a second strategy on the same model
    before = _state(strategy.model)
    with pytest.raises(ValueError) as err:
        second.train(bm.train_stream[0], eval_streams=[])
    message = str(err.value)
    assert "experience 0 has task label 0, which this model has already learned" in message
    assert "a fresh model" in message and "abandon_task" in message
    assert all(torch.equal(v, strategy.model.state_dict()[k]) for k, v in before.items())


def test_a_learned_class_incremental_experience_is_named_without_the_task_label_hint():
    from conftest import fast_benchmark

    bm = fast_benchmark(task_labels=False)
    strategy = _adam(TSNStrategy, mlp(6, 16, 10), task_inference="memory", memory_size=10)
    strategy.train(bm.train_stream[0], eval_streams=[])
    with pytest.raises(ValueError) as err:
        strategy.train(bm.train_stream[0], eval_streams=[])
    message = str(err.value)
    assert "experience 0 was already learned by this model" in message
    assert "task_inference" not in message and "task label" not in message
    assert strategy.tsn_model.trained_tasks() == [0]
