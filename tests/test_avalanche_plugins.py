"""Every training plugin of Avalanche 0.6 beside TSN: it runs with every trained task kept
bit for bit, on task-labelled streams and on class-incremental ones with task inference, or
it is refused when the strategy is built, naming the plugin and why, before the model is
touched (GEM and A-GEM crashed mid-training, GDumb silently trained a fresh model, MIR, LFL,
BiC, RAR, CoPE, generative replay and online EWC failed mid-stream where Naive runs).

The class-incremental runs are Avalanche's own ``test_strategies.py`` and
``test_optimizer.py`` scenario (``get_fast_benchmark(use_task_labels=False)``, a one-head
``SimpleMLP``), with TSN and ``task_inference=True`` in Naive's place.
"""

from __future__ import annotations

import warnings

import avalanche.training.plugins as avalanche_plugins
import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import MTSimpleMLP, SimpleMLP
from avalanche.training.plugins import (
    AGEMPlugin,
    BiCPlugin,
    CoPEPlugin,
    CWRStarPlugin,
    EarlyStoppingPlugin,
    EvaluationPlugin,
    EWCPlugin,
    FeatureDistillationPlugin,
    FromScratchTrainingPlugin,
    GDumbPlugin,
    GEMPlugin,
    GenerativeReplayPlugin,
    GSS_greedyPlugin,
    LFLPlugin,
    LRSchedulerPlugin,
    LwFPlugin,
    MASPlugin,
    MIRPlugin,
    RARPlugin,
    ReplayPlugin,
    RWalkPlugin,
    SupervisedPlugin,
    SynapticIntelligencePlugin,
)
from conftest import fast_benchmark, quiet_evaluator
from torch import nn

from avalanche_tsn import TSNStrategy, WSNStrategy
from avalanche_tsn.models import MultiHeadMLP
from avalanche_tsn.plugin_support import REFUSED_PLUGINS

#: plugins that run beside TSN: a factory taking the model and the optimizer
RUNS = {
    ReplayPlugin: lambda m, o: ReplayPlugin(mem_size=10),
    LwFPlugin: lambda m, o: LwFPlugin(),
    EWCPlugin: lambda m, o: EWCPlugin(0.1),
    SynapticIntelligencePlugin: lambda m, o: SynapticIntelligencePlugin(0.001),
    MASPlugin: lambda m, o: MASPlugin(),
    RWalkPlugin: lambda m, o: RWalkPlugin(),
    CWRStarPlugin: lambda m, o: CWRStarPlugin(m, cwr_layer_name="classifier"),
    FromScratchTrainingPlugin: lambda m, o: FromScratchTrainingPlugin(),
    LRSchedulerPlugin: lambda m, o: LRSchedulerPlugin(torch.optim.lr_scheduler.StepLR(o, 1)),
    EarlyStoppingPlugin: lambda m, o: EarlyStoppingPlugin(1, "test_stream"),
}
REFUSED = {
    GDumbPlugin: lambda: GDumbPlugin(mem_size=40),
    GEMPlugin: lambda: GEMPlugin(patterns_per_experience=4, memory_strength=0.5),
    AGEMPlugin: lambda: AGEMPlugin(patterns_per_experience=4, sample_size=4),
    LFLPlugin: lambda: LFLPlugin(lambda_e=0.1),
    FeatureDistillationPlugin: FeatureDistillationPlugin,
    MIRPlugin: lambda: MIRPlugin(mem_size=20, subsample=10, batch_size_mem=4),
    RARPlugin: lambda: RARPlugin(batch_size_mem=4, mem_size=20),
    GSS_greedyPlugin: lambda: GSS_greedyPlugin(mem_size=20, mem_strength=2, input_size=[6]),
    BiCPlugin: lambda: BiCPlugin(mem_size=20),
    CoPEPlugin: lambda: CoPEPlugin(mem_size=20, n_classes=10, p_size=10),
    GenerativeReplayPlugin: GenerativeReplayPlugin,
}
#: not training plugins of a classifier's strategy (the evaluator; the generator's own)
NOT_TRAINING = {"SupervisedPlugin", "EvaluationPlugin", "TrainGeneratorAfterExpPlugin"}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Avalanche's deprecations, per plugin
        yield


def test_every_avalanche_training_plugin_is_classified():
    names = {n for n in dir(avalanche_plugins) if n.endswith("Plugin")} - NOT_TRAINING
    assert {cls.__name__ for cls in [*RUNS, *REFUSED]} == names
    assert set(REFUSED) == set(REFUSED_PLUGINS)


def _strategy(ci: bool, plugin_of, cls=TSNStrategy):
    model = SimpleMLP(input_size=6, hidden_size=10) if ci else MTSimpleMLP(6, hidden_size=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kw = {"task_inference": True, "memory_size": 10} if ci else {}
    return model, cls(
        model=model,
        optimizer=opt,
        train_mb_size=16,
        train_epochs=2,  # RWalk scores after 10 iterations; before, its penalty is 0 / 0 (NaN)
        eval_mb_size=50,
        plugins=[plugin_of(model, opt)],
        evaluator=quiet_evaluator(),
        **kw,
    )


@pytest.mark.parametrize("ci", [False, True], ids=["task_labels", "task_inference"])
@pytest.mark.parametrize("plugin", list(RUNS), ids=lambda c: c.__name__)
def test_a_plugin_that_runs_keeps_every_trained_task_bit_identical(plugin, ci):
    if plugin is CWRStarPlugin and not ci:
        pytest.skip("Avalanche's CWR* finds no 'classifier' layer in MTSimpleMLP, with Naive too")
    if plugin is RWalkPlugin and not ci:
        pytest.skip("Avalanche's RWalk fails on multi-head models (KeyError), with Naive too")
    torch.manual_seed(0)
    bm = fast_benchmark(task_labels=not ci)
    _, strategy = _strategy(ci, RUNS[plugin])
    probes = [exp.dataset.eval()[0][0][None] for exp in bm.test_stream][:3]
    outputs: list[torch.Tensor] = []  # each trained task's output on its probe, when trained
    for i, exp in enumerate(list(bm.train_stream)[:3]):
        strategy.train(exp, eval_streams=[bm.test_stream] if plugin is EarlyStoppingPlugin else [])
        trained = strategy.tsn_model.trained_tasks()
        assert len(trained) == i + 1 and trained[-1] == (i if ci else exp.task_label)
        strategy.tsn_model.eval()
        with torch.no_grad():
            now = [strategy.tsn_model(probes[j], t) for j, t in enumerate(trained)]
        assert all(torch.equal(a, b) for a, b in zip(outputs, now[:i], strict=True)), i
        outputs.append(now[i])
    results = strategy.eval(list(bm.test_stream)[:3])
    assert any(k.startswith("Top1_Acc_Stream") for k in results)


@pytest.mark.parametrize("ci", [False, True], ids=["task_labels", "task_inference"])
@pytest.mark.parametrize("plugin", list(REFUSED), ids=lambda c: c.__name__)
def test_a_refused_plugin_is_named_before_the_model_is_touched(plugin, ci):
    model = SimpleMLP(input_size=6, hidden_size=10) if ci else MTSimpleMLP(6, hidden_size=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for cls in (TSNStrategy, WSNStrategy):
        with pytest.raises(TypeError, match=f"plugins holds {plugin.__name__}, which TSN cannot"):
            _strategy(ci, lambda m, o: REFUSED[plugin](), cls)
    with pytest.raises(TypeError, match="remove it|use ReplayPlugin"):
        TSNStrategy(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            plugins=[REFUSED[plugin]()],
        )
    assert type(model.features[0]) is nn.Linear  # not wrapped
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def test_online_ewc_is_refused_naming_the_mode_and_separate_ewc_runs():
    make = lambda m, o: EWCPlugin(0.1, mode="online", decay_factor=0.5)  # noqa: E731
    with pytest.raises(ValueError, match="mode='online'.*allowed: 'separate'"):
        _strategy(False, make)
    _, strategy = _strategy(False, lambda m, o: EWCPlugin(0.1, mode="separate"))
    assert any(isinstance(p, EWCPlugin) for p in strategy.plugins)


def test_a_refused_plugin_on_a_strategy_rebuilt_mid_stream_loses_nothing():
    bm = fast_benchmark(task_labels=True)
    model, strategy = _strategy(False, lambda m, o: ReplayPlugin(mem_size=10))
    for exp in list(bm.train_stream)[:2]:
        strategy.train(exp, eval_streams=[])
    state = {k: v.clone() for k, v in strategy.tsn_model.state_dict().items()}
    with pytest.raises(TypeError, match="GDumbPlugin"):
        TSNStrategy(
            model=strategy.tsn_model,
            optimizer=torch.optim.SGD(strategy.tsn_model.parameters(), lr=0.1),
            plugins=[GDumbPlugin(mem_size=40)],
        )
    now = strategy.tsn_model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in now)
    strategy.train(bm.train_stream[2], eval_streams=[])  # the old strategy trains on
    assert strategy.tsn_model.trained_tasks() == [0, 1, 2]


def test_optimizer_groups_on_a_class_incremental_stream_as_avalanche_tests_them():
    # Avalanche's test_optimizer_groups_clf_cil with TSN and task inference in Naive's place:
    # each parameter stays in its group (its scores join it); new ones are placed
    bm = fast_benchmark(task_labels=False)
    model = SimpleMLP(input_size=6, hidden_size=10)
    heads = [p for n, p in model.named_parameters() if "classifier" in n]
    body = [p for n, p in model.named_parameters() if "classifier" not in n]
    opt = torch.optim.SGD([{"params": heads, "lr": 0.1}, {"params": body, "lr": 0.05}])
    strategy = TSNStrategy(
        model=model,
        optimizer=opt,
        train_mb_size=16,
        train_epochs=1,
        task_inference=True,
        memory_size=10,
        evaluator=quiet_evaluator(),
    )
    for exp in list(bm.train_stream)[:3]:
        strategy.train(exp, eval_streams=[])
        group_of = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
        for name, p in strategy.tsn_model.named_parameters():
            if not p.requires_grad:
                continue
            assert id(p) in group_of, name
            assert group_of[id(p)] == (0 if "classifier" in name else 1), name


def _every_metric():
    from avalanche.evaluation import metrics as m
    from avalanche.training.plugins import EvaluationPlugin

    return EvaluationPlugin(
        m.accuracy_metrics(minibatch=True, epoch=True, experience=True, stream=True),
        m.loss_metrics(minibatch=True, epoch=True, experience=True, stream=True),
        m.forgetting_metrics(experience=True, stream=True),
        m.bwt_metrics(experience=True, stream=True),
        m.forward_transfer_metrics(experience=True, stream=True),
        m.confusion_matrix_metrics(num_classes=10, save_image=False, stream=True),
        m.timing_metrics(epoch=True, experience=True),
        m.class_accuracy_metrics(experience=True, stream=True),
        m.amca_metrics(),
        m.topk_acc_metrics(top_k=2, experience=True, stream=True),
        m.labels_repartition_metrics(on_train=True, on_eval=True),
        m.mean_scores_metrics(on_train=True, on_eval=True),
        loggers=[],
    )


@pytest.mark.parametrize("ci", [False, True], ids=["task_labels", "task_inference"])
def test_avalanche_metrics_all_at_once_with_periodic_evaluation(ci):
    torch.manual_seed(0)
    bm = fast_benchmark(task_labels=not ci)
    model = SimpleMLP(input_size=6, hidden_size=10) if ci else MTSimpleMLP(6, hidden_size=10)
    strategy = TSNStrategy(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        train_mb_size=16,
        train_epochs=1,
        eval_every=0,
        evaluator=_every_metric(),
        **({"task_inference": True, "memory_size": 10} if ci else {}),
    )
    for exp in list(bm.train_stream)[:3]:
        strategy.train(exp, eval_streams=[list(bm.test_stream)[:3]])
    results = strategy.eval(list(bm.test_stream)[:3])
    for name in ("Top1_Acc_Stream", "StreamBWT", "StreamForwardTransfer", "ConfusionMatrix"):
        assert any(k.startswith(name) for k in results), name
    if not ci:  # task labels: nothing forgotten; with inference, routing may change
        assert results["StreamBWT/eval_phase/test_stream"] == 0.0


def test_model_without_labels_before_the_first_task_returns_every_known_task():
    model = SimpleMLP(input_size=6, hidden_size=10)
    strategy = TSNStrategy(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        train_mb_size=16,
        train_epochs=1,
        task_inference=True,
        memory_size=10,
        evaluator=quiet_evaluator(),
    )
    x = torch.randn(4, 6)
    out = strategy.tsn_model.eval()(x)
    assert isinstance(out, dict)  # nothing to infer yet: Avalanche's multi-task contract
    strategy.train(fast_benchmark(task_labels=False).train_stream[0], eval_streams=[])
    routed = strategy.tsn_model.eval()(x)
    assert isinstance(routed, torch.Tensor) and torch.equal(routed, strategy.tsn_model(x, 0))


def test_avalanches_mac_metric_is_refused_naming_compute_report():
    # it counts layers by class name ("Linear"): TSN's masked layers went uncounted
    from avalanche.evaluation.metrics import MAC_metrics
    from avalanche.training.plugins import EvaluationPlugin

    model = SimpleMLP(input_size=6, hidden_size=10)
    for kw in ({"minibatch": True}, {"epoch": True}, {"experience": True}):
        with pytest.raises(TypeError, match=r"MAC.*strategy.compute_report\(\)"):
            TSNStrategy(
                model=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                evaluator=EvaluationPlugin(*MAC_metrics(**kw), loggers=[]),
            )
    assert type(model.features[0]) is nn.Linear  # not wrapped


def test_early_stopping_on_a_class_incremental_stream_sees_the_task_in_training_learn():
    # the task in training cannot be inferred before its router is fitted: its experience was
    # routed to the other tasks in periodic evaluation (accuracy ~0, flat), so early stopping
    # stopped every task after `patience` epochs (15, 2, 2 of 15; ACC 0.26 against 0.44)
    class Epochs(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.per_exp: list[int] = []

        def before_training_exp(self, strategy, **kw):
            self.per_exp.append(0)

        def after_training_epoch(self, strategy, **kw):
            self.per_exp[-1] += 1

    torch.manual_seed(0)
    bm = fast_benchmark(task_labels=False)
    model = MultiHeadMLP(6, (32,))
    epochs = Epochs()
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
    strategy = TSNStrategy(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        train_mb_size=16,
        train_epochs=8,
        eval_every=1,
        task_inference=True,
        memory_size=20,
        plugins=[epochs, EarlyStoppingPlugin(2, "test_stream", metric_name="Top1_Acc_Stream")],
        evaluator=evaluator,
    )
    for i, exp in enumerate(list(bm.train_stream)[:3]):
        strategy.train(exp, eval_streams=[list(bm.test_stream)[: i + 1]])
    assert min(epochs.per_exp) > 3, epochs.per_exp
    history = evaluator.get_all_metrics()
    live = history["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp002"][1]
    assert live[-2] > 0.6  # the last periodic evaluation while task 2 trained: as itself
    final = strategy.eval(list(bm.test_stream)[:3])  # after training: inferred, as before
    data = bm.test_stream[2].dataset.eval()
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([int(data[i][1]) for i in range(len(data))])
    routed = float((strategy.infer(x)[0].argmax(1) == y).float().mean())
    assert final["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp002"] == pytest.approx(routed)


def test_periodic_evaluation_infers_an_experience_whose_classes_other_tasks_hold_too():
    # a stream whose experiences all hold classes 0 and 1: the experience of the task in
    # training cannot be told from the others by its classes, so it is inferred as they are
    from avalanche.benchmarks import nc_benchmark
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    from avalanche_tsn.metrics import task_inference_metrics

    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 6, generator=g)

    def data(n):
        y = torch.arange(n) % 4
        x = centres[y] + torch.randn(n, 6, generator=g)
        return _make_taskaware_tensor_classification_dataset(x, y)

    bm = nc_benchmark(
        data(400), data(200), 2, task_labels=False, shuffle=False,
        class_ids_from_zero_in_each_exp=True,
    )  # fmt: skip
    assert [e.classes_in_this_experience for e in bm.train_stream] == [[0, 1], [0, 1]]
    model = MultiHeadMLP(6, (16,))
    evaluator = EvaluationPlugin(*task_inference_metrics(), loggers=[])
    strategy = TSNStrategy(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        train_mb_size=16,
        train_epochs=3,
        eval_every=1,
        task_inference=True,
        memory_size=20,
        evaluator=evaluator,
    )
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[bm.test_stream])
    history = evaluator.get_all_metrics()
    # inferred at each of task 1's 3 periodic evaluations and after it: 4 values
    assert len(history["TaskInference_Acc_Exp/eval_phase/test_stream/Exp001"][1]) == 4
