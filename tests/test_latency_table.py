"""The latency lookup table's arithmetic, checked with a fake timer that prices what it is asked to time: the
parts it stores, the MLP curve it interpolates, the end-to-end correction it fits, and what it refuses. (Real
timings are benchmarks' business: benchmarks/latency_lut.py.)"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from lookup_tables import LatencyContext, LookupTable, Timer, build_latency_table, build_lookup_table
from lookup_tables.latency import MLP_WIDTH, mlp_grid
from reports import write_report
from spvit_search.cli import main
from spvit_search.export import export_subnet, save_subnet
from supernets import MIXERS, Architecture, BlockChoice, GateConfig, build_supernet

MIXER_MS = {"skip": 0.05, "bconv1": 0.4, "bconv3": 0.9, "msa": 1.5}
CPU = torch.device("cpu")


def mlp_ms(width: int, bend: float) -> float:
    return 0.2 + 0.003 * width + bend * width * width


class FakeTimer:
    """Prices each key instead of timing it (but runs the call once, as the real one does): a mixer and an MLP by
    the tables above, a network as 1.3 x (its parts + 0.8 ms of its own) + 0.25 ms of launches."""

    def __init__(self, bend: float = 0.0) -> None:
        self.bend = bend
        self.keys: list[tuple] = []

    def network(self, arch) -> float:
        parts = sum(MIXER_MS[b.mixer] * (b.mixer != "skip" or arch.skip_mixer == "affine") for b in arch.blocks)
        parts += sum(mlp_ms(len(b.mlp_kept), self.bend) for b in arch.blocks)
        return 1.3 * (parts + 0.8) + 0.25

    def __call__(self, calls):
        return {key: self.price(key, fn) for key, fn in calls.items()}

    def price(self, key, fn):
        fn()
        self.keys.append(key)
        if key[0] == "network":
            return self.network(key[2]), 0.02
        _, _, item, choice = key[:4]
        if item == "mixer":
            return MIXER_MS[choice], 0.01
        return mlp_ms(choice, self.bend), 0.01


def tiny(skip_mixer: str = "identity"):
    torch.manual_seed(0)
    return build_supernet("test_vit", img_size=16, num_classes=10, patch_size=4, depth=3, gates=GateConfig(
        skip_mixer=skip_mixer)).eval()  # fmt: skip


CONTEXT = LatencyContext.of(CPU, batch=2, dtype="fp32", threads=1)


def latency_table(net, timer, **kwargs) -> LookupTable:
    return build_latency_table(net, lambda arch: export_subnet(net, arch), CONTEXT, timer, mlp_points=8, **kwargs)


def random_architectures(net, count: int, seed: int = 1):
    rng = random.Random(seed)
    return [net.architecture_of([BlockChoice(rng.choice(MIXERS), tuple(sorted(rng.sample(range(h), rng.randint(0, h)))))
                                 for h in net.mlp_hidden]) for _ in range(count)]  # fmt: skip


@pytest.mark.parametrize("skip_mixer", ["identity", "affine"])
def test_a_linear_world_is_predicted_exactly(skip_mixer):
    net = tiny(skip_mixer)
    timer = FakeTimer()
    lut = latency_table(net, timer)
    for arch in [net.dense_architecture(), *random_architectures(net, 6)]:
        assert lut.latency(arch) == pytest.approx(timer.network(arch), rel=1e-9)
    header = lut.meta["latency"]
    assert header["scale"] == pytest.approx(1.3) and len(header["checks"]) == 9  # the empty network, not fitted
    assert all(c["predicted_ms"] == pytest.approx(c["measured_ms"]) for c in header["checks"])
    identity_skips = [k for k in timer.keys if k[2:4] == ("mixer", "skip")]
    assert bool(identity_skips) == (skip_mixer == "affine")  # an identity skip runs nothing to time


def test_the_mlp_curve_is_interpolated_between_its_points():
    net = tiny()
    lut = latency_table(net, FakeTimer(bend=2e-5))
    frame = lut.to_frame()
    curve = frame[(frame.item == MLP_WIDTH) & (frame.block == 0)]
    assert curve.units.tolist() == mlp_grid(net.mlp_hidden[0], 8) == list(range(0, 193, 24))  # 192 hidden units
    prediction = lut.latency_prediction
    assert prediction.mlp(0, 36) == pytest.approx((mlp_ms(24, 2e-5) + mlp_ms(48, 2e-5)) / 2)
    assert prediction.mlp_slope(0, 36) == pytest.approx((mlp_ms(48, 2e-5) - mlp_ms(24, 2e-5)) / 24)
    for arch in random_architectures(net, 6, seed=2):  # off the grid, within its chords' error
        assert lut.latency(arch) == pytest.approx(FakeTimer(bend=2e-5).network(arch), rel=2e-3)


def test_saved_tables_keep_their_latency_and_refuse_other_contexts(tmp_path):
    net = tiny()
    lut = latency_table(net, FakeTimer())
    lut.save(tmp_path / "lut.csv")
    loaded = LookupTable.load(tmp_path / "lut.csv")
    arch = random_architectures(net, 1)[0]
    assert loaded.latency(arch, CONTEXT) == pytest.approx(lut.latency(arch))
    assert loaded.latency_context == CONTEXT
    header = json.loads((tmp_path / "lut.csv").read_text().splitlines()[0][2:])
    assert {"device", "batch", "dtype", "threads", "torch", "fixed_ms", "scale", "offset"} <= set(header["latency"])
    for change, field in (({"batch": 64}, "batch 2"), ({"dtype": "bf16"}, "dtype 'fp32'"),
                          ({"threads": 4}, "threads 1"), ({"device": "NVIDIA H200"}, "device")):  # fmt: skip
        other = LatencyContext(**{**CONTEXT.__dict__, **change})
        with pytest.raises(ValueError, match=f"the latency table was measured with {field}"):
            loaded.latency(arch, other)
    with pytest.raises(ValueError, match="has no latency columns; measure one with `spvit lut --latency`"):
        build_lookup_table(net).latency(arch)


def test_a_real_timer_interleaves_its_calls_and_reports_each_ones_median_and_spread():
    ticks = iter(range(100))
    order = []
    clock = lambda: next(ticks) * 1e-3  # noqa: E731 - each reading 1 ms after the last
    timer = Timer(CPU, repeats=5, warmup=1, clock=clock)
    # Each call burns clock readings of its own, so that a timing is known: "a" lasts 1 ms, "b" 3 ms.
    timings = timer({("a",): lambda: order.append("a"), ("b",): lambda: [order.append("b"), clock(), clock()]})
    assert order.count("a") == order.count("b") == 6  # one warmup and 5 timed calls each
    rounds = order[2:]
    assert all(sorted(rounds[k : k + 2]) == ["a", "b"] for k in range(0, 10, 2))  # each round calls both once
    assert timings[("a",)] == pytest.approx((1.0, 0.0)) and timings[("b",)] == pytest.approx((3.0, 0.0))


def test_lut_measures_and_eval_refuses_a_table_of_another_batch(tmp_path, capsys):
    model = ["--model", "test_vit", "--img-size", "16", "--num-classes", "10", "--model-kwargs", "patch_size=4",
             "depth=2"]  # fmt: skip
    lut_path = tmp_path / "lut.csv"
    args = ["lut", *model, "--latency", "--batch", "2", "--threads", "1", "--mlp-points", "2", "--device", "cpu"]
    assert main([*args, "--out", str(lut_path)]) == 0
    assert "correction:" in capsys.readouterr().out
    lut = LookupTable.load(lut_path)
    assert lut.latency_context.batch == 2 and lut.latency_context.threads == 1
    net = build_supernet("test_vit", img_size=16, num_classes=10, patch_size=4, depth=2)
    save_subnet(export_subnet(net, net.dense_architecture()), tmp_path / "subnet")
    evaluate = ["eval", "--subnet", str(tmp_path / "subnet"), "--lut", str(lut_path), "--device", "cpu"]
    assert main([*evaluate, "--latency-batch", "3"]) == 2
    assert "the latency table was measured with batch 2, not 3" in capsys.readouterr().err


def test_the_report_shows_predicted_latency_next_to_macs(tmp_path):
    net = tiny()
    lut = latency_table(net, FakeTimer())
    run = tmp_path / "run"
    run.mkdir()
    lut.save(run / "lut.csv")
    arch = random_architectures(net, 1, seed=4)[0]
    arch.save(run / "arch.json")
    (run / "config.json").write_text(json.dumps({"model": net.name, "target": "0.6x"}))
    frame = write_report([run], tmp_path / "report").tables["run: architecture"]
    assert frame.loc["total", "latency_ms"] == pytest.approx(lut.latency(arch))
    assert frame.loc["total", "dense_latency_ms"] == pytest.approx(lut.latency(net.dense_architecture()))
    assert frame.loc["total", "macs"] == lut.flops(arch)


def test_a_search_meets_a_latency_budget_and_refuses_impossible_ones(image_folder, tmp_path, capsys):
    torch.manual_seed(0)
    net = build_supernet("test_vit", img_size=16, num_classes=2, patch_size=4, depth=3).eval()
    timer = FakeTimer(bend=1e-5)
    lut = latency_table(net, timer)
    lut.save(tmp_path / "lut.csv")
    model = ["--model", "test_vit", "--img-size", "16", "--model-kwargs", "patch_size=4", "depth=3"]
    search = ["search", *model, "--data", str(image_folder), "--batch-size", "4", "--no-progress", "--epochs", "2",
              "--no-measure-latency", "--lut", str(tmp_path / "lut.csv")]  # fmt: skip
    dense = lut.latency(net.dense_architecture())
    assert main([*search, "--out", str(tmp_path / "run"), "--target", "0.6x", "--metric", "latency"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["target_latency_ms"] == pytest.approx(0.6 * dense) and summary["dense_latency_ms"] == dense
    arch = Architecture.load(tmp_path / "run" / "arch.json")
    assert 0.95 * summary["target_latency_ms"] <= lut.latency(arch) == summary["latency_ms"] <= summary[
        "target_latency_ms"]  # fmt: skip
    assert timer.network(arch) == pytest.approx(summary["latency_ms"], rel=2e-3)  # what the fake world measures
    assert "ms predicted" in capsys.readouterr().out
    low, high = lut.latency_range()
    for args, message in (
        (["--target", "0.001ms"], rf"budget '0.001ms' = 0.001 ms is outside the search space's range \[{low:.3f}, "),
        (["--target", "3M", "--metric", "latency"], "budget '3M' is MACs, but --metric is latency"),
    ):
        assert main([*search, "--out", str(tmp_path / "bad"), *args]) == 2
        assert re.search(message, capsys.readouterr().err)
    build_lookup_table(net).save(tmp_path / "macs.csv")
    plain = [*search[:-1], str(tmp_path / "macs.csv")]
    assert main([*plain, "--out", str(tmp_path / "bad2"), "--target", "5ms"]) == 2
    assert "--metric latency needs a latency lookup table" in capsys.readouterr().err


class UnderPredictedWorld(FakeTimer):
    """The fake world, where a network runs up to 20% slower than its parts say the smaller it is (at the
    empty network; not at the dense one): the table, fitted on a few networks, under-predicts small subnets, as it
    does on a CPU."""

    def __init__(self, net) -> None:
        super().__init__(bend=1e-5)
        self.dense = FakeTimer(bend=1e-5).network(net.dense_architecture())

    def network(self, arch) -> float:
        parts = super().network(arch)
        return parts * (1 + 0.2 * (1 - parts / self.dense))


def one_epoch_search(data, lut, out, target: str, *extra: str) -> list[str]:
    """`spvit search` of `tiny`'s supernet (2 classes) for one epoch under a latency budget of `lut`."""
    return ["search", "--model", "test_vit", "--img-size", "16", "--model-kwargs", "patch_size=4", "depth=3",
            "--data", str(data), "--batch-size", "4", "--no-progress", "--epochs", "1", "--lut", str(lut),
            "--target", target, "--metric", "latency", "--out", str(out), *extra]  # fmt: skip


def test_a_latency_search_measures_its_subnet_and_projects_again_until_it_lands(image_folder, tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = build_supernet("test_vit", img_size=16, num_classes=2, patch_size=4, depth=3).eval()
    latency_table(net, FakeTimer(bend=1e-5)).save(tmp_path / "lut.csv")  # the table of the world without the bias
    world = UnderPredictedWorld(net)
    monkeypatch.setattr("spvit_search.metric.Timer", lambda device: world)
    threads = torch.get_num_threads()
    torch.set_num_threads(CONTEXT.threads)  # the table's context, which the search must run in to measure
    try:
        for name, extra in (("measured", []), ("predicted", ["--no-measure-latency"])):
            assert main(one_epoch_search(image_folder, tmp_path / "lut.csv", tmp_path / name, "0.4x", *extra)) == 0
    finally:
        torch.set_num_threads(threads)
    measured, predicted = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("measured", "predicted"))
    target = measured["target_latency_ms"]
    miss = world.network(Architecture.load(tmp_path / "predicted" / "arch.json")) / target - 1
    assert miss > 0.05 and "measured_latency_ms" not in predicted  # the table alone misses the budget
    rounds = measured["latency_projections"]
    assert len(rounds) >= 2 and rounds[0]["goal_ms"] == target
    assert rounds[1]["goal_ms"] == pytest.approx(target * target / rounds[0]["measured_ms"])
    arch = Architecture.load(tmp_path / "measured" / "arch.json")
    # The dense model runs as predicted here, so the measured ms need no rescaling to the dense fraction.
    assert measured["measured_latency_ms"] == pytest.approx(world.network(arch), rel=2e-3)
    assert abs(measured["measured_latency_ms"] / target - 1) <= 0.02
    assert measured["latency_ms"] < target  # what the table predicts of the subnet that lands


def test_a_search_outside_the_tables_context_projects_on_the_prediction_and_says_so(image_folder, tmp_path, capsys):
    torch.manual_seed(0)
    net = build_supernet("test_vit", img_size=16, num_classes=2, patch_size=4, depth=3).eval()
    other = LatencyContext("an accelerator this is not", 2, "fp32", 1, torch.__version__)
    build_latency_table(net, lambda arch: export_subnet(net, arch), other, FakeTimer(), mlp_points=8).save(
        tmp_path / "lut.csv"
    )
    assert main(one_epoch_search(image_folder, tmp_path / "lut.csv", tmp_path / "run", "0.6x")) == 0
    assert re.search(r"spvit: warning: the subnet's latency is predicted, not measured: the latency table was "
                     r"measured with device 'an accelerator this is not'", capsys.readouterr().err)  # fmt: skip
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "measured_latency_ms" not in summary and summary["latency_ms"] <= summary["target_latency_ms"]


class FamilyFakeTimer(FakeTimer):
    """The fake world of a supernet with choices outside its gates: every part scales with the embedding width
    (T2T-ViT), and an msa pass runs G times faster split into G groups (SReT); each block runs once per pass."""

    def __init__(self, net) -> None:
        super().__init__()
        self.net, self.full = net, net.dense_architecture()

    def width_factor(self, width: int) -> float:
        return width / self.full.embed_dim if width else 1.0

    def msa_pass(self, block: int, step: int, groups: int) -> float:
        own = self.net.block_passes(block)[step].get("groups", 1)
        return MIXER_MS["msa"] / len(self.net.block_passes(block)) * own / groups

    def network(self, arch) -> float:
        scale = self.width_factor(arch.embed_dim or 0)
        parts = 0.0
        for i, b in enumerate(arch.blocks):
            passes = self.net.block_passes(i)
            if b.mixer == "msa" and arch.groups is not None:
                stage = self.net.block_stages[i]
                parts += sum(self.msa_pass(i, p, arch.groups[stage][p]) for p in range(len(passes)))
            elif b.mixer != "skip":
                parts += MIXER_MS[b.mixer] / (len(passes) if b.mixer == "msa" else 1) * len(passes)
            parts += mlp_ms(len(b.mlp_kept), 0.0) * len(passes)
        return 1.3 * (scale * parts + 0.8) + 0.25

    def price(self, key, fn):
        fn()
        if key[0] == "network":
            return self.network(key[2]), 0.02
        width, block, item, choice, *rest = key
        scale = self.width_factor(width)
        passes = len(self.net.block_passes(block))
        if item == "mixer":
            return scale * MIXER_MS[choice] / (passes if choice == "msa" else 1), 0.01
        if item == "msa_groups":
            return scale * self.msa_pass(block, rest[0], int(choice.rsplit("=", 1)[1])), 0.01
        return scale * mlp_ms(choice, 0.0), 0.01


def test_t2t_widths_and_depths_are_measured_and_predicted():
    net = build_supernet("t2t_vit_7", img_size=32, num_classes=10, embed_dim=64, depth=3).eval()
    timer = FamilyFakeTimer(net)
    lut = latency_table(net, timer)
    assert set(lut.meta["latency"]["fixed_ms"]) == {"32", "48", "64"}
    rng = random.Random(3)
    for heads, depth in ((2, 3), (3, 2), (4, 2), (4, 3)):
        width = heads * net.head_dim
        blocks = [BlockChoice(rng.choice(MIXERS), tuple(range(rng.randint(0, 2 * width)))) for _ in range(depth)]
        arch = Architecture(net.name, 32, 10, tuple(blocks), {"embed_dim": width, "num_heads": heads})
        assert lut.latency(arch) == pytest.approx(timer.network(arch), rel=1e-9)
    low, high = lut.latency_range()
    assert low < lut.latency_range(full_size=True)[0] and high == lut.latency_range(full_size=True)[1]


def test_sret_group_splits_are_measured_and_predicted():
    kwargs = dict(base_dim=8, heads=[1, 2, 4], depth=[4, 2, 2], recursive_num=[2, 1, 1])
    net = build_supernet("sret_t", img_size=64, num_classes=10, groups=[[4, 2], [2, 1], [1, 1]], **kwargs).eval()
    timer = FamilyFakeTimer(net)
    lut = latency_table(net, timer)
    dense = net.dense_architecture()
    assert lut.latency(dense) == pytest.approx(timer.network(dense), rel=1e-9)
    split = dense.with_extras(groups=((16, 1), (1, 4), (2, 2)))
    assert lut.latency(split) == pytest.approx(timer.network(split), rel=1e-9) and lut.latency(split) != lut.latency(
        dense)  # fmt: skip
    assert lut.latency_range()[1] > lut.latency_range(full_size=True)[1]  # the slowest groups are slower
