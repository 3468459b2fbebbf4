"""The structure issue 24 asks for, as invariants: one owner of per-task state (the task table,
changed only through guarded transitions), routing by calls, and a package without import
cycles hidden in functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import blob_stream, mlp, quiet_evaluator, train_tsn

from avalanche_tsn import TSNModel
from avalanche_tsn.routing import FREE, TaskRouted, run_per_group
from avalanche_tsn.stages import stage_context
from avalanche_tsn.tasks import TaskTable, calibrated, uncalibrated

PACKAGE = Path(__file__).parents[1] / "avalanche_tsn"


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _table() -> TaskTable:
    table = TaskTable(n_layers=2)
    for label in (5, 3):
        slot, restart = table.open(label, 0.5)
        assert not restart
        table.set_act_range(slot, torch.tensor([[0.0, 1.0], [-1.0, 2.0]]))
        table.store_memory(label, torch.full((4, 3), float(label)))
        assert table.freeze(label) == slot
    return table


def test_the_task_table_opens_freezes_and_drops_in_order():
    table = _table()
    assert table.trained_tasks() == [5, 3] and table.open_task() is None
    assert table.slot_of(3) == 1 and table.frozen_slot(3) == 1 and table.label_of(0) == 5
    slot, restart = table.open(7, 0.25)
    assert (slot, restart) == (2, False) and table.frozen_slot(7) is None
    assert table.open(7, 0.75) == (2, True)  # an interrupted task reopens its own slot
    assert table.sparsity_of(2) == 0.75
    table.store_memory(7, torch.ones(6, 3))
    assert table.drop_open() == (7, 2)
    assert len(table) == 2 and table.drop_open() is None
    assert table.samples.codes.shape[0] == 2
    assert torch.equal(table.memory(3), torch.full((4, 3), 3.0))
    assert bool(calibrated(table.act_range).all())


@pytest.mark.parametrize(
    "action, error",
    [
        (lambda t: t.open(5, 0.5), ValueError),  # trained: frozen for good
        (lambda t: t.open(9, 1.5), ValueError),
        (lambda t: (t.open(9, 0.5), t.open(8, 0.5)), RuntimeError),  # one open task at a time
        (lambda t: t.freeze(3), RuntimeError),
        (lambda t: t.freeze(42), RuntimeError),
        (lambda t: t.restore([1], [0.5], [0], uncalibrated(1, 2)), RuntimeError),
        (lambda t: t.set_act_range(0, torch.zeros(3, 2)), ValueError),
        (lambda t: t.store_memory(3, torch.ones(2, 4)), ValueError),
    ],
)
def test_a_refused_transition_leaves_every_trained_record_as_it_was(action, error):
    table = _table()
    before = _state(table)
    with pytest.raises(error):
        action(table)
    after = table.state_dict()
    for key, value in before.items():  # the trained slots, 0 and 1, are untouched
        if value.dim() == 0:  # a flag of the whole table (the memory's integral)
            assert torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key][:2], value[:2]), key
    assert table.trained_tasks() == [5, 3]


def test_restore_checks_every_list_before_filling_an_empty_table():
    table = TaskTable(n_layers=2)
    with pytest.raises(ValueError, match="same slots"):
        table.restore([1, 2], [0.5], [0, 0], uncalibrated(2, 2))
    assert len(table) == 0
    table.restore([1, 2], [0.5, 0.25], [0, 3], uncalibrated(2, 2))
    assert table.trained_tasks() == [1, 2] and table.open_task() is None
    assert table.sparsity_of(1) == 0.25 and table.head_codebook(0)[1] == 0


def test_the_model_keeps_its_task_records_in_the_table_and_reads_old_state_dicts():
    strategy, bm = train_tsn(tasks=2, memory_size=16, task_inference="memory")
    model = strategy.model
    keys = list(model.state_dict())
    assert "task_table.task_labels_by_slot" in keys and "task_labels_by_slot" not in keys
    assert all(k.startswith(("net.", "task_table.", "task_router.")) for k in keys)
    # a 0.4 state dict held the records on the model itself, the memory as float32 samples
    # (and no moved buffers: 0.10 added them)
    old = {
        (k.split(".", 1)[1] if k.startswith("task_table.") else k): v
        for k, v in model.state_dict().items()
        if not k.startswith(("task_table.samples.", "task_table.moved_buffers."))
    }
    memories = [model.memory(t) for t in (0, 1)]
    assert [len(m) for m in memories] == [16, 16]
    old["memory_x"] = torch.stack(memories)
    old["memory_len"] = torch.tensor([16, 16])
    fresh = TSNModel(mlp())
    fresh.load_state_dict(old)
    assert fresh.trained_tasks() == model.trained_tasks() == [0, 1]
    assert fresh.known_train_tasks_labels == {0, 1}
    kept = lambda state: {k: v for k, v in state.items() if ".samples." not in k}  # noqa: E731
    assert _same(kept(_state(fresh)), kept(_state(model)))
    assert all(torch.equal(fresh.memory(t), m) for t, m in zip((0, 1), memories, strict=True))
    assert fresh.memory_bits() == 32 * 2 * 16 * 12  # kept as the float32 it was stored in
    x = torch.randn(32, 12)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x, 1), model.eval()(x, 1))


def test_routing_is_a_call_and_a_mixed_minibatch_leaves_every_layer_on_the_live_route():
    strategy, _ = train_tsn(tasks=2)
    model = strategy.model.eval()
    layers = model.routed_layers()
    assert all(isinstance(m, TaskRouted) for m in layers)
    x, t = torch.randn(20, 12), torch.arange(20) % 2
    with torch.no_grad():
        mixed = model(x, t)
        assert all(m.active_slot == FREE and m.task_groups is None for m in layers)
        for label in (0, 1):
            assert torch.equal(mixed[t == label], model(x[t == label], label))
    assert all(m.active_slot == model.slot_of(1) for m in layers)  # the last one-task route
    # the route is not state: it is not saved, and a state dict does not carry it
    assert not any("route" in k.rsplit(".", 1)[-1] for k in model.state_dict())
    rows = torch.arange(6.0).unsqueeze(1)
    out = run_per_group(rows, ((0, 2), (FREE, 4)), lambda r, s: r * 10 + s)
    assert torch.equal(out, torch.tensor([[0.0], [10.0], [19.0], [29.0], [39.0], [49.0]]))


def _imports_inside_functions() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith(
                        "avalanche_tsn"
                    ):
                        found.append(f"{path.name}:{inner.lineno} {inner.module}")
    return found


def test_no_module_of_the_package_imports_another_inside_a_function():
    """Imports inside functions hid three import cycles; optional third-party imports (sklearn,
    torchvision, dahuffman) may stay lazy."""
    assert _imports_inside_functions() == []


def test_the_stage_context_hands_each_value_once_and_names_a_missing_producer():
    class Strategy:  # any Avalanche strategy: the context is kept beside it, not on it
        pass

    strategy = Strategy()
    ctx = stage_context(strategy)
    assert stage_context(strategy) is ctx and vars(strategy) == {}
    ctx.bank = 2
    assert ctx.take_bank() == 2 and ctx.take_bank() is None  # a stale bank cannot leak
    with pytest.raises(RuntimeError, match="pruning needs a validation split.*ValidationSplit"):
        ctx.require_validation("pruning")
    ctx.validation_batches, ctx.validation_memo = [], ("old",)
    ctx.new_validation("split")
    assert ctx.require_validation("pruning") == "split"
    assert ctx.validation_batches is None and ctx.validation_memo is None
    other = Strategy()
    assert stage_context(other) is not ctx and stage_context(other).validation is None


def test_pruning_without_a_validation_split_names_the_missing_stage():
    from avalanche.training import Naive

    from avalanche_tsn import MaskLearningPlugin
    from avalanche_tsn.plugins import PruningPlugin

    bm = blob_stream(n_tasks=1, dim=12)
    model = TSNModel(mlp())
    strategy = Naive(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        train_mb_size=16,
        plugins=[MaskLearningPlugin(0.5), PruningPlugin()],
        evaluator=quiet_evaluator(),
    )
    with pytest.raises(RuntimeError, match="needs a validation split: add a ValidationSplitPlugin"):
        strategy.train(bm.train_stream[0])


def test_the_recipes_run_their_stages_in_the_declared_order():
    from avalanche_tsn import AdaQPacknetStrategy, TSNStrategy, WSNStrategy
    from avalanche_tsn.plugins import (
        ActivationCalibrationPlugin,
        MaskLearningPlugin,
        PruningPlugin,
        QuantizationPlugin,
        TensorBatchesPlugin,
        ValidationSplitPlugin,
    )
    from avalanche_tsn.plugins.adaqpacknet import HalvingQuantizationPlugin, MaskSearchPlugin

    def order(cls, **kw):
        model = mlp()
        strategy = cls(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            evaluator=quiet_evaluator(),
            **kw,
        )
        return [type(p) for p in strategy.plugins if type(p).__module__.startswith("avalanche_tsn")]

    assert order(TSNStrategy) == [
        MaskLearningPlugin,
        ValidationSplitPlugin,
        PruningPlugin,
        QuantizationPlugin,
        ActivationCalibrationPlugin,
        TensorBatchesPlugin,
    ]
    assert order(WSNStrategy) == [
        MaskLearningPlugin,
        ActivationCalibrationPlugin,
        TensorBatchesPlugin,
    ]
    assert order(AdaQPacknetStrategy) == [
        MaskLearningPlugin,
        ValidationSplitPlugin,
        MaskSearchPlugin,
        HalvingQuantizationPlugin,
        ActivationCalibrationPlugin,
        TensorBatchesPlugin,
    ]


def test_no_class_over_300_lines_and_no_function_over_80():
    """The shape issue 24 asks for: small classes and functions in the package."""
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            limit = {ast.ClassDef: 300, ast.FunctionDef: 80, ast.AsyncFunctionDef: 80}.get(
                type(node)
            )
            if limit is not None and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{path.name}: {node.name}")
    assert too_long == []


def _module_imports() -> dict[str, set[str]]:
    modules = {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in PACKAGE.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module level; TYPE_CHECKING is an If
            if isinstance(node, ast.ImportFrom) and (node.module or "") in modules:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names} & modules
        graph[name] = deps - {name}
    return graph


def test_the_package_has_no_import_cycle():
    graph = _module_imports()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if dep.startswith(module + "."):
                continue  # a package importing its own submodules
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_moved_buffers_record_keeps_each_name_once_in_order_and_checks_them():
    from avalanche_tsn.tasks import MovedBuffers

    moved = MovedBuffers()
    assert moved.names() == []
    moved.note(["0.mean", "0.steps"])
    moved.note(["1.ema", "0.mean", "1.ema"])
    assert moved.names() == ["0.mean", "0.steps", "1.ema"]
    before = moved.encoded.clone()
    for bad in (["a\nb"], [""], [3]):
        with pytest.raises(ValueError, match="buffer names must be"):
            moved.note(bad)
    assert torch.equal(moved.encoded, before)
    loaded = MovedBuffers()
    loaded.load_state_dict(moved.state_dict())
    assert loaded.names() == moved.names()
    loaded.load_state_dict({})  # written before 0.10
    assert loaded.names() == []
