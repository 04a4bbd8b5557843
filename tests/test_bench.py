"""The benchmark harness: the floor, PEFT's twin, the timer and the CLI (no timing assertions)."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
from torch import nn

from lora_vision.bench import layers, multi, rank_gemms, report, traffic
from lora_vision.bench import profile as bench_profile
from lora_vision.bench.__main__ import main
from lora_vision.bench.configs import BenchConfig, Settings, select_configs, select_lora_configs, select_options
from lora_vision.bench.floor import attach_floor
from lora_vision.bench.flops import count_flops
from lora_vision.bench.memory import in_child
from lora_vision.bench.peft_side import peft_version
from lora_vision.bench.sides import (
    COMPOSED,
    FLOOR,
    OURS,
    PEFT,
    ComposedLoRAConv2d,
    ComposedLoRALinear,
    adapted_names,
    build_base,
    make_batch,
    prepare_side,
    trainable_parameters,
)
from lora_vision.bench.timing import Runs, Stats, rotated, time_alternating, time_runs
from lora_vision.lora import LoRALayer, lora_layers
from tests.helpers import randomize_adapters, tiny_resnet, tiny_vit

SETTINGS = Settings(quick=True, rank=4, alpha=8.0)
VIT_QV = BenchConfig("vit", "qv", ("qv",), peft_peer="whole qkv")
RESNET_LAST_STAGE = BenchConfig("resnet", "last_stage", ("resnet_last_stage",))


def _outputs_of(model: nn.Module, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inputs and outputs of the named modules in the next forward pass, outputs keeping their gradients."""
    inputs, outputs = {}, {}

    def keep(name: str):
        def hook(module, args, output):
            inputs[name] = args[0]
            if output.requires_grad:
                output.retain_grad()
            outputs[name] = output

        return hook

    for name in names:
        model.get_submodule(name).register_forward_hook(keep(name))
    return inputs, outputs


@pytest.mark.parametrize(("build", "config"), [(tiny_vit, VIT_QV), (tiny_resnet, RESNET_LAST_STAGE)])
def test_floor_trains_nothing_and_gradients_stop_at_the_adapted_outputs(build, config, images) -> None:
    floor = build().train()
    names = adapted_names(floor, config)
    attach_floor(floor, names)
    inputs, outputs = _outputs_of(floor, names)
    assert trainable_parameters(floor) == 0
    floor(images).logsumexp(-1).sum().backward()
    assert all(p.grad is None for p in floor.parameters())
    # Every adapted layer's output gets its gradient, parallel branches (the downsample) included ...
    assert all(outputs[name].grad is not None and outputs[name].grad.abs().sum() > 0 for name in names)
    # ... and nothing below the lowest adapted layer: its input is not part of the graph.
    assert not inputs[names[0]].requires_grad


def test_floor_computes_the_activation_gradients_lora_sees(images) -> None:
    """At init (B = 0) ours computes the base function, so the gradients at the adapted outputs must agree."""
    base = tiny_vit().train()
    ours = prepare_side(copy.deepcopy(base), VIT_QV, OURS, SETTINGS)
    floor = prepare_side(copy.deepcopy(base), VIT_QV, FLOOR, SETTINGS)
    names = adapted_names(base, VIT_QV)
    seen = []
    for model in (ours, floor):
        _, outputs = _outputs_of(model, names)
        model(images).logsumexp(-1).sum().backward()
        seen.append(outputs)
    for name in names:
        torch.testing.assert_close(seen[0][name].grad, seen[1][name].grad)


def _copy_adapters_into_peft(ours: nn.Module, twin: nn.Module) -> int:
    twins = dict(twin.base_model.model.named_modules())
    layers = [(name, m) for name, m in ours.named_modules() if isinstance(m, LoRALayer)]
    with torch.no_grad():
        for name, layer in layers:
            a, b = twins[name].lora_A["default"].weight, twins[name].lora_B["default"].weight
            a.copy_(layer.lora_A.view_as(a))
            b.copy_(layer.lora_B.view_as(b))
    return len(layers)


@pytest.mark.parametrize(
    ("build", "config"),
    [
        (tiny_vit, BenchConfig("vit", "qkv", ("qkv_fused",))),
        (tiny_vit, BenchConfig("vit", "all_linear", ("all_linear",))),
        (tiny_vit, BenchConfig("vit", "last2", ("all_linear",), blocks="-2:")),
        (tiny_resnet, BenchConfig("resnet", "conv3x3", ("conv3x3",))),
    ],
)
def test_peft_twin_computes_our_function_on_the_same_modules(build, config, images) -> None:
    pytest.importorskip("peft", reason="peft is a dev dependency")
    base = build()
    ours = prepare_side(copy.deepcopy(base), config, OURS, SETTINGS).eval()
    twin = prepare_side(copy.deepcopy(base), config, PEFT, SETTINGS).eval()
    randomize_adapters(ours, std=0.05)
    assert _copy_adapters_into_peft(ours, twin) == len(adapted_names(base, config))
    assert trainable_parameters(ours) == trainable_parameters(twin)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), twin(images), atol=1e-5, rtol=1e-5)


def test_peft_peer_of_q_v_slices_is_the_whole_qkv_with_the_same_budget() -> None:
    pytest.importorskip("peft", reason="peft is a dev dependency")
    base = tiny_vit()
    ours = prepare_side(copy.deepcopy(base), VIT_QV, OURS, SETTINGS)
    twin = prepare_side(copy.deepcopy(base), VIT_QV, PEFT, SETTINGS)
    assert trainable_parameters(ours) == trainable_parameters(twin) > 0


@pytest.mark.parametrize(
    ("build", "config", "composed_class"),
    [
        (tiny_vit, BenchConfig("vit_s16", "all_linear", ("all_linear",), composed_side=True), ComposedLoRALinear),
        (tiny_resnet, BenchConfig("resnet50", "all_convs", ("all_convs",), composed_side=True), ComposedLoRAConv2d),
    ],
)
def test_composed_side_is_ours_computed_from_plain_ops(build, config, composed_class, images) -> None:
    settings = Settings(quick=True)
    base = build()
    # In eval mode: train-mode BatchNorm over ResNet's 1x1 last stage (2 values per channel here) would amplify
    # the float rounding in which the two paths differ into differences of whole units.
    fused = prepare_side(copy.deepcopy(base), config, OURS, settings).eval()
    composed = prepare_side(copy.deepcopy(base), config, COMPOSED, settings).eval()
    randomize_adapters(fused)
    randomize_adapters(composed)
    layers = [m for m in composed.modules() if isinstance(m, LoRALayer)]
    assert layers and all(type(m) is composed_class for m in layers)
    grads = []
    for model in (fused, composed):
        model(images).square().sum().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(fused(images), composed(images), atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_timer_rotates_the_order_and_reports_medians() -> None:
    order: list[str] = []
    now = [0.0]
    durations = {"a": iter([9.0, 1.0, 2.0, 3.0]), "b": iter([9.0, 10.0, 30.0, 20.0]), "c": iter([9.0, 5.0, 5.0, 5.0])}

    def call(name: str):
        def run() -> None:
            order.append(name)
            now[0] += next(durations[name])

        return run

    stats = time_alternating({n: call(n) for n in "abc"}, warmup=1, repeats=3, clock=lambda: now[0])
    assert order == list("abc" + "abc" + "bca" + "cab")  # warm-up round, then a new leader each round
    assert {n: s.median for n, s in stats.items()} == {"a": 2000.0, "b": 20000.0, "c": 5000.0}
    assert (stats["b"].min, stats["b"].max, stats["b"].samples) == (10000.0, 30000.0, 3)
    assert rotated(list("abc"), 4) == list("bca")


def test_stats_quartiles() -> None:
    stats = Stats.of([0.004, 0.001, 0.003, 0.002, 0.005])
    assert (stats.median, stats.q1, stats.q3) == pytest.approx((3.0, 2.0, 4.0))
    assert Stats.of([0.002]).q1 == Stats.of([0.002]).q3 == pytest.approx(2.0)


def test_unknown_config_names_the_choices() -> None:
    with pytest.raises(ValueError, match="vit_s16/qv"):
        select_configs(["vit_s16/nope"])
    assert [c.name for c in select_configs(["*/qv"])] == ["vit_s16/qv", "vit_b16/qv"]


def test_quick_cli_writes_the_tables(tmp_path) -> None:
    argv = [
        "--quick",
        "--configs",
        "vit_s16/qv",
        "resnet50/linear_probe",
        "--no-memory",
        "--options",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    table = (tmp_path / "results.md").read_text()
    assert "python -m lora_vision.bench --quick --configs" in table
    assert "| vit_s16/qv | tiny ViT" in table and "| resnet50/linear_probe |" in table
    assert "## Inference" in table and "## Thresholds" in table
    record = json.loads((tmp_path / "results.json").read_text())
    qv = record["rows"][0]
    assert set(qv["ms"]) >= {"ours", "floor"} and qv["ours_over_floor"]["median"] > 0
    assert qv["inference"]["merged_over_base"]["median"] > 0
    assert qv["composed_over_ours"]["median"] > 0 and "## The fused LoRA nodes" in table
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 3


def test_option_rows_time_each_option_against_its_configuration(tmp_path) -> None:
    argv = ["--quick", "--configs", "vit_s16/*", "resnet50/conv3x3", "--no-inference", "--no-memory"]
    argv += ["--options", "compile", "channels_last", "grad_checkpointing", "--out", str(tmp_path)]
    assert main(argv) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    options = {(row["config"], row["option"]): row for row in record["option_rows"]}
    assert set(options) == {
        ("vit_s16/qv", "compile"),
        ("vit_s16/all_linear", "grad_checkpointing"),
        ("resnet50/conv3x3", "channels_last"),
        ("resnet50/conv3x3", "compile"),
    }
    assert all(row["speedup"]["median"] > 0 and set(row["ms"]) == {"without", "with"} for row in options.values())
    assert "| resnet50/conv3x3 | channels_last |" in (tmp_path / "results.md").read_text()


def test_unknown_option_names_the_choices() -> None:
    with pytest.raises(ValueError, match="choose from bf16, compile"):
        select_options(select_configs(None), ["fast"])


@pytest.mark.slow
def test_quick_cli_measures_memory_in_child_processes(tmp_path) -> None:
    assert main(["--quick", "--configs", "vit_s16/qv", "--no-inference", "--out", str(tmp_path)]) == 0
    peaks = json.loads((tmp_path / "results.json").read_text())["rows"][0]["peak_mib"]
    assert set(peaks) >= {"ours", "floor"} and all(mib > 0 for mib in peaks.values())


def test_rank_gemm_table_times_every_product_of_the_lora_step(capsys) -> None:
    rows = rank_gemms.measure(tokens=64, in_features=16, out_features=48, rank=4, repeats=2)
    assert [row["product"].split(":")[0] for row in rows][:2] == ["layer", "h = x A^T"]
    assert len(rows) == 6 and all(row["ms"] > 0 and row["gflops"] > 0 for row in rows)
    assert rank_gemms.main(["--tokens", "32", "--in-features", "8", "--out-features", "24", "--repeats", "1"]) == 0
    assert "| dB = (h^T g)^T |" in capsys.readouterr().out
    conv_rows = rank_gemms.measure_conv(batch=1, channels=8, size=6, rank=2, repeats=1)
    assert len(conv_rows) == 7 and all(row["ms"] > 0 and row["gflops"] > 0 for row in conv_rows)
    assert rank_gemms.main(["--conv", "--batch", "1", "--channels", "8", "--size", "6", "--repeats", "1"]) == 0
    assert "| dA: kernel gradient of A |" in capsys.readouterr().out


@pytest.mark.parametrize("config_name", ["vit_s16/qv", "resnet50/conv3x3"])
def test_every_way_of_serving_a_mixed_batch_gives_each_sample_its_own_adapter_s_logits(config_name: str) -> None:
    """The multi-adapter benchmark compares equal work: routed, merged and switching give the same logits, and each
    sample's are those of a model holding only its adapter."""
    settings, (config,) = Settings(quick=True), select_configs([config_name])
    images = multi.batch_images(config, settings)
    logits = {
        approach: multi.serve_once(multi.build_approach(approach, config, 3, settings)[0], images, settings)
        for approach in multi.APPROACHES
    }
    torch.testing.assert_close(logits[multi.MERGED], logits[multi.ROUTED], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[multi.SWITCHING], logits[multi.ROUTED], atol=1e-5, rtol=1e-5)
    routing = multi.mixed_routing(3, len(images), settings.seed)
    assert Counter(routing) == {"task0": 3, "task1": 3, "task2": 2} and routing != sorted(routing)
    alone = []
    with torch.inference_mode():
        for index in range(3):
            alone.append(multi.adapted_model(config, settings, [index])(images))
            rows = [i for i, name in enumerate(routing) if name == f"task{index}"]
            torch.testing.assert_close(logits[multi.ROUTED][rows], alone[-1][rows], atol=1e-5, rtol=1e-5)
    # The adapters differ, so serving a sample through another adapter would have failed above.
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)


def test_serving_approaches_hold_n_models_or_one_base_and_n_adapters() -> None:
    settings, (config,) = Settings(quick=True), select_configs(["vit_s16/qv"])
    base = multi.parameter_count([build_base(settings.model(config), settings)])
    one = multi.adapted_model(config, settings, [0])
    adapter = sum(p.numel() for layer in lora_layers(one) for p in layer.adapters["task0"].parameters())
    held = {
        approach: multi.parameter_count(multi.build_approach(approach, config, 4, settings)[1])
        for approach in multi.APPROACHES
    }
    assert held == {multi.ROUTED: base + 4 * adapter, multi.MERGED: 4 * base, multi.SWITCHING: base + 4 * adapter}


def test_quick_multi_adapter_cli_writes_every_adapter_count(tmp_path) -> None:
    argv = ["--quick", "--configs", "vit_s16/qv", "--no-memory", "--out", str(tmp_path)]
    assert multi.main(argv) == 0
    table = (tmp_path / "multi_adapter.md").read_text()
    assert "python -m lora_vision.bench.multi --quick --configs vit_s16/qv" in table and "## vit_s16/qv" in table
    for count in multi.ADAPTER_COUNTS:
        for approach in multi.APPROACHES:
            assert f"| {count} | {approach} |" in table
    rows = json.loads((tmp_path / "multi_adapter.json").read_text())["rows"]
    assert [(row["adapters"], row["approach"]) for row in rows] == [
        (count, approach) for count in multi.ADAPTER_COUNTS for approach in multi.APPROACHES
    ]
    assert all(row["images_per_s"] > 0 and row["batch_size"] == multi.QUICK_BATCH for row in rows)


@pytest.mark.slow
def test_merged_models_hold_a_model_per_adapter_in_memory() -> None:
    settings, (config,) = Settings(quick=True), select_configs(["resnet50/conv3x3"])
    held = {
        approach: in_child(multi.serving_memory, approach, config, 2, settings)
        for approach in (multi.ROUTED, multi.MERGED)
    }
    model_mib = multi.parameter_count([build_base(settings.model(config), settings)]) * 4 / 2**20
    # The second merged ResNet-18 (43 MiB); the routed model's second adapter is 0.3 MiB.
    assert held[multi.MERGED]["held"] - held[multi.ROUTED]["held"] > 0.7 * model_mib
    assert all(memory["peak"] >= memory["held"] for memory in held.values())


@pytest.mark.parametrize("config_name", ["vit_s16/qv", "resnet50/conv3x3"])
def test_one_packed_step_gives_each_point_its_separate_gradient(config_name: str) -> None:
    """Each point of a pack gets its own gradient from the summed loss: every adapter factor's and head's gradient is
    its separate model's (in float64, to 1e-9). Compared before AdamW's step, whose first update is about
    lr * sign(gradient): gradients that are zero up to rounding would flip it."""
    settings, (config,) = Settings(quick=True), select_configs([config_name])
    points = multi.point_models(config, 3, settings)
    for point in points:
        randomize_adapters(point)  # B = 0 would leave every A without a gradient
        point.double()  # float64: a wrong gradient shows far above rounding, however deep the network
    packed = multi.packed_model(points, settings, config).double()
    images, labels = multi.make_batch(settings.model(config), settings)
    images = images.double()
    steps = [multi.PackedStep(packed, 3, images, labels, settings)]
    steps += [multi.TrainStep(point, images, labels, settings) for point in points]
    for step in steps:
        step.optimizer.step = step.optimizer.zero_grad = lambda *args, **kwargs: None
        step()
    head = multi.classifier_name(packed)
    mine = dict(packed.named_parameters())
    for index, point in enumerate(points):
        for name, param in point.named_parameters():
            if param.requires_grad:
                packed_name = name.replace(".adapters.default.", f".adapters.p{index}.")
                packed_name = packed_name.replace(f"{head}.", f"{head}.heads.p{index}.", 1)
                assert param.grad is not None and param.grad.abs().sum() > 0
                torch.testing.assert_close(mine[packed_name].grad, param.grad, atol=1e-9, rtol=1e-9)


def test_quick_packed_training_cli_writes_every_point_count(tmp_path) -> None:
    argv = [
        "--train",
        "--quick",
        "--configs",
        "vit_s16/qv",
        "--adapters",
        "1",
        "2",
        "--no-memory",
        "--out",
        str(tmp_path),
    ]
    assert multi.main(argv) == 0
    table = (tmp_path / "packed_training.md").read_text()
    assert "a packed N-point step against N separate steps" in table
    for count in (1, 2):
        for approach in multi.TRAIN_APPROACHES:
            assert f"| {count} | {approach} |" in table


def test_runs_keep_each_run_s_ratio_and_a_threshold_counts_the_worst_run() -> None:
    now = [0.0]
    # Two runs of one warm-up and two timed rounds: "a" is 0.9 of "b" in the first run and 1.2 in the second.
    durations = {"a": iter([1, 0.9, 0.9, 1, 1.2, 1.2]), "b": iter([1, 1, 1, 1, 1, 1])}

    def call(name: str):
        def run() -> None:
            now[0] += next(durations[name])

        return run

    runs = time_runs({n: call(n) for n in "ab"}, runs=2, warmup=1, repeats=2, clock=lambda: now[0])
    assert runs.medians == [pytest.approx({"a": 900.0, "b": 1000.0}), pytest.approx({"a": 1200.0, "b": 1000.0})]
    spread = runs.ratio("a", "b")
    assert (spread.min, spread.max) == pytest.approx((0.9, 1.2)) and runs.pooled["a"].samples == 4
    assert runs.ratio("a", "missing") is None
    row = {"config": "c", "ratio": spread.as_dict()}
    # The median run (1.05) meets "<= 1.1", the worst (1.2) does not; nor does the lowest (0.9) meet ">= 1.0".
    assert "missed: c (1.200)" in report._missed([row], lambda r: r["ratio"], 1.1, above=False)
    assert "missed: c (0.900)" in report._missed([row], lambda r: r["ratio"], 1.0, above=True)
    assert report._missed([row], lambda r: r["ratio"], 1.25, above=False) == "1/1 met"


def test_grouped_conv_gradients_are_counted_per_group() -> None:
    conv = nn.Conv2d(32, 32, 3, padding=1, groups=32)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    forward = count_flops(lambda: conv(x))
    assert forward == 2 * 2 * 32 * 8 * 8 * 9  # per output element, 9 multiply-adds within its own channel
    # The input and the kernel gradient each cost one forward pass (torch alone counts the kernel's 32x over).
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward


def test_a_configuration_peft_cannot_build_runs_without_it(tmp_path) -> None:
    (config,) = select_configs(["effnet_lite0/all_convs"])
    settings = Settings(quick=True)
    if peft_version() is not None:
        # The reason the row gives still holds: PEFT refuses rank 8 on depthwise convs.
        with pytest.raises(ValueError, match="divisible by groups"):
            prepare_side(build_base(settings.model(config), settings), config, PEFT, settings)
    argv = ["--quick", "--configs", config.name, "--no-memory", "--no-inference", "--options", "--runs", "2"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert set(row["ms"]) == {"ours", "floor", "composed"} and row["peft_over_ours"] is None
    assert len(row["ours_over_floor"]["runs"]) == 2 and len(row["runs_ms"]) == 2
    assert "none: depthwise convs need rank % groups == 0" in (tmp_path / "results.md").read_text()


def test_traffic_account_counts_what_lora_keeps_and_moves(tmp_path) -> None:
    settings = Settings(quick=True)
    (config,) = select_configs(["vit_s16/all_linear"])
    spec = settings.model(config)
    base = build_base(spec, settings)
    images, labels = make_batch(spec, settings)
    ours = prepare_side(copy.deepcopy(base), config, OURS, settings)
    floor = prepare_side(copy.deepcopy(base), config, FLOOR, settings)
    shapes = traffic.adapted_shapes(ours, images)
    assert len(shapes) == 8  # qkv, proj, fc1, fc2 of 2 blocks
    assert shapes[0] == traffic.LayerShape(2 * 17, 64, 192, 1, 192)  # 16 patches + class token per image
    # A LoRA Linear keeps its input for dA; the floor's frozen Linear needs none of it. The fc2 input (the GELU's
    # output) and both LayerNorm outputs are kept by nothing else: at least those bytes more.
    extra = traffic.saved_bytes(ours, images, labels) - traffic.saved_bytes(floor, images, labels)
    assert extra >= 2 * 2 * 17 * (64 + 64 + 256) * 4
    assert traffic.main(["--quick", "--configs", config.name, "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "traffic.json").read_text())["rows"]
    assert row["limit"]["median"] > 1 and row["product_mib"] > 0 and row["adapted_layers"] == 8
    assert "| vit_s16/all_linear |" in (tmp_path / "traffic.md").read_text()


def test_layer_inputs_are_what_the_step_feeds_each_adapted_layer() -> None:
    settings = Settings(quick=True)
    (config,) = select_configs(["resnet50/conv3x3"])
    spec = settings.model(config)
    base = build_base(spec, settings)
    images, _ = make_batch(spec, settings)
    sides = (OURS, FLOOR, COMPOSED, *([PEFT] if peft_version() else []))
    models = {side: prepare_side(copy.deepcopy(base), config, side, settings) for side in sides}
    names = adapted_names(base, config)
    inputs = layers.layer_inputs(models[OURS], names, images, seed=0)
    assert [given.name for given in inputs] == names  # a ResNet reaches its convs in the order it names them
    # Nothing below the first adapted conv trains, so only its input needs no gradient.
    assert [given.x.requires_grad for given in inputs] == [False] + [True] * (len(names) - 1)
    seen = {}
    hooks = [
        models[FLOOR]
        .get_submodule(name)
        .register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, out))
        for name in names
    ]
    with torch.no_grad():
        models[FLOOR](images)
    for hook in hooks:
        hook.remove()
    for given in inputs:
        frozen = layers.side_layer(models[FLOOR], FLOOR, given.name)
        with torch.no_grad():
            torch.testing.assert_close(frozen(given.x), seen[given.name])  # the recorded input is the step's
        assert given.grad.shape == seen[given.name].shape
    last = inputs[-1]
    for side in (side for side in sides if side != FLOOR):
        layer = layers.side_layer(models[side], side, last.name)
        # PEFT's own LoRA layer where the side is PEFT's, ours elsewhere: the layer each side trains.
        assert type(layer).__module__.startswith("peft.") == (side == PEFT) and layer.lora_A is not None
        layers.layer_step(layer, last)()
        assert last.x.grad is not None and all(p.grad is not None for p in layer.parameters() if p.requires_grad)
        grad_x = last.x.grad.clone()
        layers.layer_step(layer, last)()  # cleared, not accumulated, as zero_grad(set_to_none=True) leaves them
        torch.testing.assert_close(last.x.grad, grad_x)


def test_layers_row_sums_layers_run_by_run(monkeypatch, tmp_path) -> None:
    # Every layer timed at floor 1, ours 3, PEFT 4, composed 5 ms in run one and twice that in run two: each run
    # sums its layers, the added time is side - floor, and the ratios are taken run by run.
    def fake_time_runs(calls, runs, warmup, repeats, steps):
        ms = {FLOOR: 1.0, OURS: 3.0, PEFT: 4.0, COMPOSED: 5.0}
        medians = [{side: ms[side] * (run + 1) for side in calls} for run in range(runs)]
        return Runs({side: Stats.of([medians[0][side] / 1e3]) for side in calls}, medians)

    monkeypatch.setattr(layers, "time_runs", fake_time_runs)
    settings = Settings(quick=True, runs=2)
    (config,) = select_configs(["resnet50/conv3x3"])
    row = layers.layers_row(config, settings)
    n = row["adapted_layers"]
    assert n == len(row["layers"]) > 1
    assert [run[OURS] for run in row["runs_ms"]] == [3.0 * n, 6.0 * n]
    assert row["added_ms"][OURS]["runs"] == [2.0 * n, 4.0 * n]
    assert row["added_ms"][COMPOSED]["median"] == pytest.approx(6.0 * n)
    assert row["composed_over_ours_added"]["runs"] == pytest.approx([2.0, 2.0])
    if peft_version():
        assert row["peft_over_ours_added"]["median"] == pytest.approx(1.5)
        assert row["peft_over_ours"]["median"] == pytest.approx(4 / 3)


def test_layers_cli_writes_its_record(tmp_path) -> None:
    assert layers.main(["--quick", "--configs", "resnet50/conv3x3", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "layers.json").read_text())["rows"]
    assert set(row["added_ms"]) == {OURS, COMPOSED, *([PEFT] if peft_version() else [])}
    text = (tmp_path / "layers.md").read_text()
    assert "| resnet50/conv3x3 |" in text and "| layer4.1.conv2 |" in text


def test_adapter_tools_name_configurations_without_adapters() -> None:
    # The per-layer, traffic and profile tools compare adapters: a baseline alone, or an unknown name, is a message.
    with pytest.raises(SystemExit, match=r"\['resnet50/full'\]: no LoRA configuration among them"):
        layers.main(["--quick", "--configs", "resnet50/full"])
    with pytest.raises(SystemExit, match=r"\['nope/\*'\] match no configuration; choose from vit_s16/qkv"):
        select_lora_configs(["nope/*"])
    assert [config.name for config in select_lora_configs(["resnet50/*"])] == ["resnet50/conv3x3", "resnet50/all_convs"]


@pytest.mark.parametrize(
    "tool", [main, layers.main, traffic.main, multi.main], ids=["bench", "layers", "traffic", "multi"]
)
def test_bench_tools_refuse_a_negative_warmup_before_building_anything(tool, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        tool(["--quick", "--warmup", "-1"])
    assert exited.value.code == 2 and "argument --warmup: must be >= 0, got -1" in capsys.readouterr().err


def test_profile_lists_each_side_s_ops(capsys) -> None:
    assert bench_profile.main(["--quick", "--configs", "resnet50/conv3x3", "--steps", "1", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    sides = ("ours", "floor", "composed", *(["peft"] if peft_version() else []))
    assert all(f"resnet50/conv3x3, {side}:" in out for side in sides)
    assert "| aten::convolution_backward |" in out
