"""The task memory's lossless codes: exact round trips, widths, widening, loading, counting."""

from __future__ import annotations

import io
import re

import pytest
import torch
from conftest import train_tsn

from avalanche_tsn.task_memory import TaskMemory, code_bits, coded_bytes, level_codes
from avalanche_tsn.tasks import TaskTable


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def _eight_bit(n: int, seed: int = 0) -> torch.Tensor:
    """Samples as ToTensor makes them from 8-bit images: k / 255 in float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 4, 4), generator=g).float().div(255)


def test_levels_are_bit_patterns_and_decode_bit_for_bit():
    nan_a = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    nan_b = torch.tensor([0x7FC00002], dtype=torch.int32).view(torch.float32)
    x = torch.cat([torch.tensor([0.0, -0.0, 1.5, 1.5, float("inf")]), nan_a, nan_b])
    levels, codes = level_codes(x)
    assert len(levels) == 6  # -0.0 and 0.0 apart, the two NaN payloads apart
    assert torch.equal(_bits(levels[codes]), _bits(x))


@pytest.mark.parametrize(
    "levels, values, bits",
    [(17, 64 * 100, 8), (256, 784 * 100, 8), (257, 10_000, 16), (768, 3072 * 10, 16),
     (65_537, 10**6, 32), (100, 100, 32), (5_000, 8_000, 32)],
)  # fmt: skip
def test_code_width_is_the_smallest_that_stores_fewer_bits(levels, values, bits):
    assert code_bits(levels, values) == bits
    stored = coded_bytes(values // 4, 4, levels)
    assert stored <= 4 * values  # never more than float32
    if bits < 32:
        assert stored == values * bits // 8 + 4 * levels


def test_memory_stores_eight_bit_data_in_one_byte_a_value_exactly():
    memory = TaskMemory()
    xs = [_eight_bit(30, 0), _eight_bit(20, 1)]
    for slot, x in enumerate(xs):
        memory.store(slot, x, n_slots=2)
    assert memory.codes.dtype == torch.uint8 and memory.bits_per_value() == 8
    for slot, x in enumerate(xs):
        assert torch.equal(_bits(memory.get(slot)), _bits(x))
    levels = sum(len(torch.unique(x)) for x in xs)
    assert memory.bits() == 8 * 16 * 50 + 32 * levels


def test_a_wider_slot_widens_the_others_without_changing_them():
    memory = TaskMemory()
    small = _eight_bit(10)
    memory.store(0, small, n_slots=1)
    g = torch.Generator().manual_seed(1)
    many = torch.randint(0, 1000, (1000, 1, 4, 4), generator=g).float() / 7  # 1000 levels
    memory.store(1, many, n_slots=2)
    assert memory.codes.dtype == torch.int16
    noise = torch.randn(5, 1, 4, 4, generator=g)  # every value distinct: float32 is smaller
    memory.store(2, noise, n_slots=3)
    assert memory.codes.dtype == torch.float32 and memory.bits() == 32 * 16 * 1015
    for slot, x in enumerate((small, many, noise)):
        assert torch.equal(_bits(memory.get(slot)), _bits(x))


def test_an_empty_memory_keeps_the_others_coded():
    memory = TaskMemory()
    x = _eight_bit(12)
    memory.store(0, x, n_slots=2)
    memory.store(1, x[:0], n_slots=2)
    assert memory.codes.dtype == torch.uint8 and len(memory.get(1)) == 0
    assert torch.equal(memory.get(0), x) and memory.bits() == 8 * 16 * 12 + 32 * int(
        memory.n_levels[0]
    )


def test_bad_memory_changes_nothing():
    table = TaskTable(n_layers=1)
    table.open(0, 0.5)
    table.store_memory(0, _eight_bit(8))
    before = {k: v.clone() for k, v in table.state_dict().items()}
    with pytest.raises(ValueError, match=r"task 0: memory samples have shape \(16,\)"):
        table.store_memory(0, torch.zeros(8, 16))
    with pytest.raises(ValueError, match="never started training"):
        table.store_memory(3, _eight_bit(8))
    after = table.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_dropping_the_open_task_drops_its_memory_only():
    table = TaskTable(n_layers=1)
    xs = [_eight_bit(6, s) for s in range(2)]
    for label, x in enumerate(xs):
        table.open(label, 0.5)
        table.store_memory(label, x)
        if label == 0:
            table.freeze(0)
    assert table.drop_open() == (1, 1)
    assert len(table.samples.lengths) == 1 and len(table.memory(1)) == 0
    assert torch.equal(table.memory(0), xs[0])


@pytest.mark.parametrize("kind", ["uint8", "int16", "float32"])
def test_state_dict_round_trip_keeps_codes_and_samples(kind):
    memory = TaskMemory()
    g = torch.Generator().manual_seed(2)
    span = {"uint8": 200, "int16": 3000, "float32": None}[kind]
    x = torch.randn(2000, 8, generator=g)
    if span is not None:
        x = torch.randint(0, span, (2000, 8), generator=g).float() / 3
    memory.store(0, x, n_slots=1)
    assert str(memory.codes.dtype) == f"torch.{kind}"
    buf = io.BytesIO()
    torch.save(memory.state_dict(), buf)
    buf.seek(0)
    loaded = TaskMemory()
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    assert loaded.codes.dtype == memory.codes.dtype and loaded.bits() == memory.bits()
    assert torch.equal(_bits(loaded.get(0)), _bits(x))


def test_a_trained_model_checkpoint_restores_its_coded_memory_and_routing():
    strategy, bm = train_tsn(tasks=2, memory_size=16, task_inference="memory")
    model = strategy.tsn_model
    memories = [model.memory(t) for t in (0, 1)]
    stored = model.task_table.samples
    levels = int(stored.n_levels.sum())
    width = stored.bits_per_value()
    # the report counts what is stored: codes where they are smaller, else float32
    assert model.memory_bits() == 2 * 16 * 12 * width + (32 * levels if width < 32 else 0)
    assert strategy.capacity_report().memory_bits == model.memory_bits()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh, _ = train_tsn(tasks=1, memory_size=16, task_inference="memory")
    fresh.tsn_model.load_state_dict(torch.load(buf, weights_only=True))
    for t, m in zip((0, 1), memories, strict=True):
        assert torch.equal(_bits(fresh.tsn_model.memory(t)), _bits(m))
    x = torch.stack([e.dataset[i][0] for e in bm.test_stream for i in range(len(e.dataset))])
    assert torch.equal(fresh.infer(x)[1], strategy.infer(x)[1])


def test_the_router_trains_on_eight_bit_digits_with_a_memory_of_one_byte_a_value():
    from conftest import adam_strategy

    from avalanche_tsn.datasets import permuted_digits
    from avalanche_tsn.models import MultiHeadMLP

    bm = permuted_digits(2, seed=0)
    strategy = adam_strategy(MultiHeadMLP(64, (16,), 10), memory_size=20, task_inference="router")
    strategy.train(bm.train_stream, eval_streams=[])
    model = strategy.tsn_model
    stored = model.task_table.samples
    assert stored.codes.dtype == torch.uint8  # the digits' 17 levels
    for exp in bm.train_stream:
        rows = {tuple(_bits(x).tolist()) for x, *_ in exp.dataset}
        memory = model.memory(exp.task_label)
        # every kept sample is one of the task's training samples, bit for bit
        assert len(memory) == 20 and all(tuple(_bits(m).tolist()) in rows for m in memory)
    assert model.memory_bits() == 2 * 20 * 64 * 8 + 32 * int(stored.n_levels.sum())
    assert int(stored.n_levels.max()) <= 17
    assert strategy.capacity_report().memory_bits == model.memory_bits()


def test_the_tiny_model_keeps_the_memory_only_where_it_routes_by_it():

    from avalanche_tsn.tiny import resident_bytes, to_tiny

    strategy, x = _trained_ci("router")
    out, _ = strategy.infer(x)
    model = strategy.tsn_model
    assert model.memory_bits() > 0 and model.task_table.samples.bits_per_value() == 8
    with pytest.raises(TypeError, match="keep_memory must be a bool or None"):
        to_tiny(model, keep_memory=1)  # type: ignore[arg-type]
    assert type(model).__name__ == "TSNModel" and model.memory_bits() > 0  # nothing changed
    full_bytes = resident_bytes(model)
    tiny = to_tiny(model)  # the router never reads the memory: released
    assert tiny.memory_bits() == 0 and resident_bytes(tiny) < full_bytes
    with torch.no_grad():
        assert torch.equal(tiny(x), out)
    strategy, x = _trained_ci("memory")
    out, _ = strategy.infer(x)
    memories = [strategy.tsn_model.memory(t) for t in strategy.tsn_model.trained_tasks()]
    tiny = to_tiny(strategy.tsn_model)  # the memory rule reads it: kept, bit for bit
    assert all(
        torch.equal(_bits(tiny.memory(t)), _bits(m))
        for t, m in zip(tiny.trained_tasks(), memories, strict=True)
    )
    with torch.no_grad():
        assert torch.equal(tiny(x), out)
    strategy, _ = _trained_ci("router")
    assert to_tiny(strategy.tsn_model, keep_memory=True).memory_bits() > 0


def _trained_ci(method: str, n_tasks: int = 3, stream: bool = False, **kwargs):
    """A class-incremental run on inputs on a grid (an 8-bit coded memory), and its test x;
    with ``n_tasks`` > 3 only the first 3 train (and ``stream`` returns the stream too)."""
    from conftest import adam_strategy
    from test_task_inference import class_incremental

    from avalanche_tsn.models import MultiHeadMLP

    torch.manual_seed(0)
    bm = class_incremental(separable=False, n_tasks=n_tasks, grid=0.25)
    strategy = adam_strategy(MultiHeadMLP(12, (16, 16)), task_inference=method, **kwargs)
    for exp in list(bm.train_stream)[:3]:
        strategy.train(exp, eval_streams=[])
    x = torch.stack([e.dataset[i][0] for e in bm.test_stream for i in range(len(e.dataset))])
    return (strategy, x, bm) if stream else (strategy, x)


def _same_memories(a, b) -> bool:
    return a.trained_tasks() == b.trained_tasks() and all(
        torch.equal(_bits(a.memory(t)), _bits(b.memory(t))) for t in a.trained_tasks()
    )


@pytest.mark.parametrize("dequantize", [True, False])
def test_the_export_of_a_memory_routed_model_carries_its_memory_and_routes_the_same(dequantize):
    from avalanche_tsn.export import export_model, load_compressed
    from avalanche_tsn.models import MultiHeadMLP

    strategy, x = _trained_ci("memory")
    model = strategy.tsn_model
    out, _ = strategy.infer(x)
    with_memory, without = io.BytesIO(), io.BytesIO()
    size = strategy.export(with_memory)  # the memory rule reads the memory: written
    smaller = export_model(model, without, keep_memory=False)
    assert model.task_table.samples.bits_per_value() == 8
    # the 8-bit codes and each task's levels, and a few bytes of header
    assert model.memory_bits() // 8 <= size - smaller <= model.memory_bits() // 8 + 200
    with_memory.seek(0)
    loaded = load_compressed(with_memory, MultiHeadMLP(12, (16, 16)), dequantize=dequantize)
    assert loaded.task_inference == "memory"  # the file says how its tasks are inferred
    assert _same_memories(loaded, model) and loaded.memory_bits() == model.memory_bits()
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    without.seek(0)
    bare = load_compressed(without, MultiHeadMLP(12, (16, 16)), dequantize=dequantize)
    assert bare.memory_bits() == 0
    with pytest.raises(ValueError, match=re.escape("export_model(..., keep_memory=True)")):
        bare(x)


def test_a_router_models_export_leaves_the_memory_out_unless_asked():
    from avalanche_tsn.export import export_model, load_compressed
    from avalanche_tsn.models import MultiHeadMLP

    strategy, x = _trained_ci("router")
    model = strategy.tsn_model
    out, _ = strategy.infer(x)
    buf = io.BytesIO()
    for bad in (1, "yes"):  # refused before anything is written
        with pytest.raises(TypeError, match="keep_memory must be a bool or None"):
            strategy.export(buf, keep_memory=bad)
        with pytest.raises(TypeError, match="keep_memory must be a bool or None"):
            export_model(model, buf, keep_memory=bad)
    assert buf.getvalue() == b""
    files = {}
    for keep in (None, True):
        files[keep] = io.BytesIO()
        export_model(model, files[keep], keep_memory=keep)
        files[keep].seek(0)
    default = load_compressed(files[None], MultiHeadMLP(12, (16, 16)))
    kept = load_compressed(files[True], MultiHeadMLP(12, (16, 16)))
    assert default.task_inference == kept.task_inference == "router"
    assert default.memory_bits() == 0
    assert _same_memories(kept, model) and kept.memory_bits() == model.memory_bits()
    with torch.no_grad():
        assert torch.equal(default(x), out) and torch.equal(kept(x), out)


def _memory_file_edits():
    from test_guarantees import _DELETE, _set

    def last_code_past_its_levels(header, payload):
        n_levels = header["memory"]["tasks"][-1][2]
        at = len(payload) - 4 * n_levels - 1  # the last task's last code, before its levels
        return payload[:at] + bytes([255]) + payload[at + 1 :]

    return [
        (_set(["memory", "tasks", 0, 1], 12), None),
        (_set(["memory", "tasks", 0, 0], -1), None),
        (_set(["memory", "tasks"], []), None),
        (_set(["memory", "shape"], [0]), None),
        (_set(["memory", "shape"], [13]), None),
        (_set(["memory", "shape"], []), None),
        (_set(["task_inference"], "oracle"), None),
        (_set(["memory"], _DELETE), None),  # its codes are then trailing data
        (None, last_code_past_its_levels),
    ]


@pytest.fixture(scope="module")
def memory_export() -> bytes:
    strategy, _ = _trained_ci("memory")
    buf = io.BytesIO()
    strategy.export(buf)
    return buf.getvalue()


@pytest.mark.parametrize("edit", range(9))
def test_a_corrupt_memory_in_an_export_is_refused_before_the_model_changes(memory_export, edit):
    import json
    import struct
    import zlib

    from test_guarantees import _rewrite

    from avalanche_tsn.export import load_compressed
    from avalanche_tsn.models import MultiHeadMLP

    data = memory_export
    edit_header, edit_payload = _memory_file_edits()[edit]
    start = struct.calcsize("<4sHI")
    header = json.loads(zlib.decompress(data[start : start + struct.unpack_from("<4sHI", data)[2]]))
    assert header["memory"]["tasks"][-1][1] == 8 and header["memory"]["tasks"][-1][2] < 255
    payload_edit = None if edit_payload is None else (lambda p: edit_payload(header, p))
    corrupt = _rewrite(data, edit_header, payload_edit)
    model = MultiHeadMLP(12, (16, 16))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="corrupt"):
        load_compressed(io.BytesIO(corrupt), model)
    assert type(model.features[0]) is torch.nn.Linear  # not even wrapped
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_encode_samples_round_trips_each_width_and_decode_refuses_bad_codes() -> None:
    from avalanche_tsn.task_memory import decode_samples, encode_samples

    few = torch.tensor([[0.0, -0.0, 0.5], [1.0, 0.5, 0.0]]).repeat(40, 1)
    few.view(torch.int32)[1::2, 2] = 0x7FC00001  # a NaN with a payload
    many = torch.arange(3000.0).view(1000, 3).repeat(4, 1)  # 3000 levels in 12000 values
    noise = torch.randn(50, 3)
    for x, bits in ((few, 8), (many, 16), (noise, 32), (few, 16), (torch.zeros(0, 3), 8)):
        min_bits = bits if x is few and bits == 16 else 8
        width, codes, levels = encode_samples(x, min_bits)
        assert width == bits and codes.shape == x.shape
        assert torch.equal(_bits(decode_samples(width, codes, levels)), _bits(x))
    width, codes, levels = encode_samples(few)
    with pytest.raises(ValueError, match="out of range"):
        decode_samples(width, codes, levels[:2])
    with pytest.raises(ValueError, match="must be torch.uint8"):
        decode_samples(8, codes.to(torch.int16), levels)
    with pytest.raises(ValueError, match="memory codes of 12 bits"):
        decode_samples(12, codes, levels)


@pytest.mark.parametrize("method", ["router", "entropy"])
def test_training_further_from_an_export_needs_the_memory_where_a_stage_reads_it(method, caplog):
    from conftest import adam_strategy

    from avalanche_tsn.export import export_model, load_compressed
    from avalanche_tsn.models import MultiHeadMLP

    # the router and task matching read every trained task's memory while a task trains
    strategy, x, bm = _trained_ci(method, n_tasks=4, stream=True, task_matching=True)
    fourth = list(bm.train_stream)[3]
    files = {}
    for keep in (False, True):
        files[keep] = io.BytesIO()
        export_model(strategy.tsn_model, files[keep], keep_memory=keep)
        files[keep].seek(0)
    bare = load_compressed(files[False], MultiHeadMLP(12, (16, 16)))
    with torch.no_grad():
        before = {t: bare(x, t) for t in bare.trained_tasks()}
    further = adam_strategy(bare, task_inference=method, task_matching=True)
    if method == "router":  # refused before any work: nothing opened, nothing changed
        with pytest.raises(ValueError, match=r"tasks \[0, 1, 2\] keep no memory.*keep_memory=True"):
            further.train(fourth, eval_streams=[])
        assert bare.open_task() is None and bare.trained_tasks() == [0, 1, 2]
    else:  # task matching alone compares with what it has, and says what it lacks
        with caplog.at_level("WARNING", logger="avalanche_tsn.plugins.similarity"):
            further.train(fourth, eval_streams=[])
        assert "tasks [0, 1, 2] keep no memory" in caplog.text
    kept = load_compressed(files[True], MultiHeadMLP(12, (16, 16)))
    caplog.clear()
    further = adam_strategy(kept, task_inference=method, task_matching=True)
    with caplog.at_level("WARNING", logger="avalanche_tsn.plugins.similarity"):
        further.train(fourth, eval_streams=[])
    assert "keep no memory" not in caplog.text
    assert kept.trained_tasks() == [0, 1, 2, 3]
    if method == "router":
        assert kept.task_router.fitted_tasks() == [0, 1, 2, 3]
    with torch.no_grad():  # the earlier tasks, bit for bit as exported
        assert all(torch.equal(kept(x, t), before[t]) for t in before)


def test_integer_samples_come_back_as_the_same_int64_token_ids():
    memory = TaskMemory()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (500, 12), generator=g)  # 300 ids: 16-bit codes
    memory.store(0, ids, n_slots=2)
    memory.store(1, ids[:300].to(torch.int32), n_slots=2)  # any integer dtype
    assert bool(memory.integral) and memory.codes.dtype == torch.int16
    assert memory.get(0).dtype == torch.long and torch.equal(memory.get(0), ids)
    assert torch.equal(memory.get(1), ids[:300]) and memory.get(None).dtype == torch.long
    # the flag is learned state: it comes back with the state dict
    loaded = TaskMemory()
    loaded.load_state_dict(memory.state_dict())
    assert torch.equal(loaded.get(0), ids) and loaded.get(0).dtype == torch.long


def test_integer_samples_out_of_float32s_exact_range_or_mixed_with_floats_change_nothing():
    memory = TaskMemory()
    memory.store(0, torch.tensor([[1, 2], [3, 4]]), n_slots=2)
    before = {k: v.clone() for k, v in memory.state_dict().items()}
    with pytest.raises(ValueError, match=r"memory samples are floats, earlier ones integers"):
        memory.store(1, torch.ones(2, 2), n_slots=2)
    with pytest.raises(ValueError, match=r"within \+-16777215 .* got 16777216"):
        memory.store(1, torch.tensor([[1, 1 << 24]]), n_slots=2)
    after = memory.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    floats = TaskMemory()
    floats.store(0, torch.ones(2, 2), n_slots=1)
    with pytest.raises(ValueError, match=r"memory samples are integers, earlier ones floats"):
        floats.store(0, torch.ones(2, 2, dtype=torch.long), n_slots=1)


def test_a_memory_state_dict_written_before_integer_samples_loads_as_floats():
    memory = TaskMemory()
    memory.store(0, _eight_bit(4), n_slots=1)
    old = {k: v for k, v in memory.state_dict().items() if k != "integral"}
    loaded = TaskMemory()
    loaded.load_state_dict(old)  # strict: the missing flag means floats
    assert not bool(loaded.integral) and torch.equal(loaded.get(0), memory.get(0))
