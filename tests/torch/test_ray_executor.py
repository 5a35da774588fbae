"""Executors: Ray calibration shards and layer solves bit-identical to a local run; faults,
checkpoints, bad input; and the local path's blocked Hessian order that makes it possible."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import obc_native

from obc_native.torch import LayerConfig, compress
from obc_native.torch.calibration import model_device
from obc_native.torch.checkpoint import LayerCheckpoint
from obc_native.torch.executor_choice import as_executor
from obc_native.torch.executors import (
    ROW_ALIGN,
    LocalExecutor,
    merge_rows,
    row_ranges,
    row_separable,
    solve_rows,
)
from obc_native.torch.hessian import LayerHessian
from obc_native.torch.layers import describe_layer, find_layers
from obc_native.torch.nonuniform import _Applications, build_database

from obc_torch_helpers import MLP, TinyCNN

compress_module = sys.modules["obc_native.torch.compress"]

HERE = os.path.dirname(os.path.abspath(__file__))
# where the obc_native under test comes from: the installed package (CI, scripts/test.sh) or the
# source tree with a dev build (PYTHONPATH=python); never the unbuilt python/ of a clean checkout
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(obc_native.__file__)))

# Ray's own modules warn at import and shutdown (deprecations of their dependencies); the suite
# turns warnings into errors, which is meant for obc_native's own code.
ray_warnings = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning",
                                          "ignore::UserWarning", "ignore::FutureWarning")


def assert_state_equal(model, other):
    theirs = other.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, theirs[key]), key


def assert_reports_equal(report, other):
    assert [layer.name for layer in report.layers] == [layer.name for layer in other.layers]
    for mine, theirs in zip(report.layers, other.layers):
        assert (mine.loss, mine.baseline_loss, mine.sparsity, mine.damp) == (
            theirs.loss, theirs.baseline_loss, theirs.sparsity, theirs.damp
        ), mine.name


def mlp_model(seed=0, sizes=(16, 520, 8, 8)):
    """520 rows in layers.0: three row tasks of a row-separable mode (ranges start at multiples
    of ROW_ALIGN = 256)."""
    torch.manual_seed(seed)
    return MLP(sizes)


def mlp_batches(count=5):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(24, 16, generator=generator) for _ in range(count)]


# ---- without Ray


def test_ray_is_never_imported_unless_asked_for():
    code = textwrap.dedent(
        """
        import sys, torch
        import obc_native.torch
        from obc_native.torch import LayerConfig, compress
        model = torch.nn.Sequential(torch.nn.Linear(8, 4))
        compress(model, [torch.randn(16, 8)], LayerConfig(prune="nm", n=2, m=4), quiet=True)
        assert "ray" not in sys.modules, "ray was imported"
        """
    )
    env = {**os.environ, "PYTHONPATH": PACKAGE}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_as_executor_rejects_unknown_values():
    assert isinstance(as_executor("local"), LocalExecutor)
    assert isinstance(as_executor(None), LocalExecutor)
    with pytest.raises(ValueError, match="executor: expected one of"):
        as_executor("dask")
    with pytest.raises(TypeError, match="executor: expected one of"):
        as_executor(3)


def test_missing_ray_package_is_one_clear_error_before_any_work(monkeypatch):
    from obc_native.torch.ray_executor import RayUnavailableError

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    model = mlp_model()
    before = copy.deepcopy(model)
    with pytest.raises(RayUnavailableError, match=r"pip install 'obc_native\[ray\]'"):
        compress(model, mlp_batches(), LayerConfig(prune="nm", n=2, m=4), executor="ray", quiet=True)
    assert_state_equal(model, before)
    with pytest.raises(RayUnavailableError, match="needs the ray package"):
        build_database(model, mlp_batches(), executor="ray", quiet=True)


def test_unreachable_cluster_is_one_clear_error_before_any_work():
    pytest.importorskip("ray")
    from obc_native.torch.ray_executor import RayExecutor, RayUnavailableError

    model = mlp_model()
    before = copy.deepcopy(model)
    with pytest.raises(RayUnavailableError, match=r"'127.0.0.1:1' is unreachable"):
        compress(model, mlp_batches(), LayerConfig(prune="nm", n=2, m=4), executor=RayExecutor("127.0.0.1:1"),
                 quiet=True)
    assert_state_equal(model, before)
    with pytest.raises(ValueError, match="address: expected 'host:port'"):
        RayExecutor("no-port").start()
    with pytest.raises(ValueError, match="min_rows: expected an integer >= 1"):
        RayExecutor(min_rows=0)


SEPARABLE = [
    LayerConfig(prune="nm", n=2, m=4),
    LayerConfig(prune="unstructured", sparsity=0.5, spread="uniform"),
    LayerConfig(prune="blocked", sparsity=0.5, block=4, spread="uniform"),
    LayerConfig(prune="nm", n=2, m=4, bits=4),
    LayerConfig(bits=4),
    LayerConfig(bits=3, group_size=8, sym=False, quant_method="gptq"),
    LayerConfig(bits=4, quant_method="obq"),
    LayerConfig(bits=4, quant_method="gptq-natural"),
    LayerConfig(prune="unstructured", sparsity=0.5, spread="uniform", method="magnitude"),
    LayerConfig(bits=4, method="rtn"),
]


@pytest.mark.parametrize("config", SEPARABLE, ids=lambda c: f"{c.label}-{c.method}-{c.quant_method}")
def test_rows_solved_in_separate_calls_equal_one_call(config):
    """What row tasks rely on: every mode row_separable accepts gives the same bits per row
    whatever rows are solved together (and the per-row losses too)."""
    assert row_separable(config)
    rng = np.random.default_rng(0)
    rows, cols = 600, 16
    x = rng.standard_normal((300, cols))
    hessian = 2 * x.T @ x / 300
    weight = rng.standard_normal((rows, cols)).astype(np.float32)
    info = describe_layer("layer", nn.Linear(cols, rows))
    baseline = config.method == "obc"
    whole = merge_rows([solve_rows(info, weight, hessian, config, baseline, None)])
    aligned = row_ranges(rows, 3, ROW_ALIGN)
    assert aligned == [(0, 256), (256, 512), (512, 600)]
    for ranges in (aligned, [(0, 7), (7, 300), (300, 600)]):
        split = merge_rows(
            [solve_rows(info, weight[a:b], hessian, config, baseline, 1, a) for a, b in ranges]
        )
        assert np.array_equal(whole.result.weight, split.result.weight)
        for key in ("scale", "zero"):
            mine, theirs = getattr(whole.result, key), getattr(split.result, key)
            assert (mine is None and theirs is None) or np.array_equal(mine, theirs)
        # the losses too: a row's loss does not depend on the rows solved with it
        assert (whole.loss, whole.baseline_loss) == (split.loss, split.baseline_loss)


def test_non_separable_modes_are_one_task_per_unit():
    assert not row_separable(LayerConfig(prune="unstructured", sparsity=0.5))  # global sparsity
    assert not row_separable(LayerConfig(prune="structured", sparsity=0.5))
    assert not row_separable(LayerConfig(prune="nm", n=2, m=4, prune_method="sparsegpt"))
    assert not row_separable(LayerConfig(bits=4), level=object())
    assert row_ranges(5, 8) == [(i, i + 1) for i in range(5)]
    assert row_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert row_ranges(520, 3, ROW_ALIGN) == [(0, 256), (256, 512), (512, 520)]
    assert row_ranges(100, 4, ROW_ALIGN) == [(0, 100)]


def test_hessian_batch_partials_merge_to_the_same_bits():
    """Batches accumulated in separate accumulators and merged in batch order equal one
    accumulator that saw them all, for any split."""
    model = TinyCNN().eval()
    batches = [torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    info = find_layers(model)["conv2"]

    def inputs_of(batch):
        captured = []
        handle = info.module.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        with torch.no_grad():
            model(batch)
        handle.remove()
        return captured

    local = LayerHessian(info)
    for batch in batches:
        for x in inputs_of(batch):
            local.add(x)
        local.end_batch()
    for split in ([0, 5], [0, 2, 5], [0, 1, 3, 4, 5]):
        merged = LayerHessian(info)
        for a, b in zip(split[:-1], split[1:]):
            shard = LayerHessian(info, keep_partials=True)
            for batch in batches[a:b]:
                for x in inputs_of(batch):
                    shard.add(x)
                shard.end_batch()
            merged.merge_partials(shard.batch_partials())
        assert merged.n == local.n
        assert all(np.array_equal(m, h) for m, h in zip(merged.hessians(), local.hessians()))
        assert np.array_equal(merged.input_mean(), local.input_mean())


# ---- checkpoints (local executor)


class DriverCrash(RuntimeError):
    pass


@pytest.mark.parametrize("sequential", [False, True])
def test_checkpoint_resumes_without_redoing_finished_layers(tmp_path, monkeypatch, sequential):
    config = LayerConfig(prune="nm", n=2, m=4, bits=4)
    batches = mlp_batches()
    expected = mlp_model()
    expected_report = compress(expected, batches, config, sequential=sequential, quiet=True)

    solved: list[str] = []
    run = compress_module._Run.compress_layer

    def crashing_run(self, name, *args, **kwargs):
        if len(solved) == 2:
            raise DriverCrash("driver killed halfway")
        solved.append(name)
        return run(self, name, *args, **kwargs)

    monkeypatch.setattr(compress_module._Run, "compress_layer", crashing_run)
    with pytest.raises(DriverCrash):
        compress(mlp_model(), batches, config, sequential=sequential, quiet=True, checkpoint=tmp_path)
    assert solved == ["layers.0", "layers.1"]
    assert len(LayerCheckpoint(tmp_path, _fingerprint_of(tmp_path))) == 2

    solved.clear()
    model = mlp_model()
    report = compress(model, batches, config, sequential=sequential, quiet=True, checkpoint=tmp_path)
    assert solved == ["layers.2"]  # the finished layers were not solved again
    assert_state_equal(model, expected)
    assert_reports_equal(report, expected_report)


def test_budget_checkpoint_resumes_without_rebuilding_the_database(tmp_path, monkeypatch):
    """compress_to_budget with a checkpoint: the level database and the finished layers are kept;
    a rerun after a crash neither rebuilds the database nor solves those layers again."""
    from obc_native.torch import compress_to_budget

    batches = mlp_batches()
    expected = mlp_model()
    expected_report = compress_to_budget(expected, batches, "params=2x", quiet=True)

    solved: list[str] = []
    crash_after = [1]  # layers the first run finishes before the driver dies
    run = compress_module._Run.compress_layer

    def crashing_run(self, name, *args, **kwargs):
        if len(solved) == crash_after[0]:
            raise DriverCrash("driver killed halfway")
        solved.append(name)
        return run(self, name, *args, **kwargs)

    monkeypatch.setattr(compress_module._Run, "compress_layer", crashing_run)
    with pytest.raises(DriverCrash):
        compress_to_budget(mlp_model(), batches, "params=2x", quiet=True, checkpoint=tmp_path)
    assert os.path.exists(tmp_path / "levels.json") and len(solved) == 1
    crash_after[0] = -1

    def no_build(*args, **kwargs):
        raise AssertionError("the level database was built again")

    monkeypatch.setattr(compress_module, "_build", no_build)
    first = list(solved)
    solved.clear()
    model = mlp_model()
    report = compress(model, batches, budget="params=2x", quiet=True, checkpoint=tmp_path)
    assert solved and not set(solved) & set(first)  # the finished layer was not solved again
    assert_state_equal(model, expected)
    assert [row.level for row in report.layers] == [row.level for row in expected_report.layers]
    assert report.budget == expected_report.budget
    # another budget is another run: refused, not mixed in
    with pytest.raises(ValueError, match="holds layers of another run"):
        compress_to_budget(mlp_model(), batches, "params=3x", quiet=True, checkpoint=tmp_path)


def _fingerprint_of(directory):
    import json

    with open(os.path.join(directory, "run.json"), encoding="utf-8") as handle:
        return json.load(handle)["fingerprint"]


def test_checkpoint_of_another_run_is_refused(tmp_path):
    batches = mlp_batches()
    compress(mlp_model(), batches, LayerConfig(prune="nm", n=2, m=4), quiet=True, checkpoint=tmp_path)
    for model, config in (
        (mlp_model(seed=1), LayerConfig(prune="nm", n=2, m=4)),  # other weights
        (mlp_model(), LayerConfig(bits=4)),  # other recipe
    ):
        before = copy.deepcopy(model)
        with pytest.raises(ValueError, match="holds layers of another run"):
            compress(model, batches, config, quiet=True, checkpoint=tmp_path)
        assert_state_equal(model, before)


# ---- on a local Ray cluster


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    # workers import obc_native and the test helpers (pickled by reference) from these paths
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([PACKAGE, HERE] + ([saved] if saved else []))
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def ray_executor(**kwargs):
    from obc_native.torch.ray_executor import RayExecutor

    return RayExecutor(**{"row_tasks": 3, **kwargs})


@ray_warnings
def test_ray_split_dense_calibration_is_bit_identical_to_a_local_run(ray_cluster):
    # Hessians (counted twice) of 2 * 8 * (16^2, 520^2, 8^2) = 4096, 4326400, 1024 bytes: one at a time
    recipe = {"default": {"prune": "nm", "n": 2, "m": 4, "bits": 4}}
    batches = mlp_batches()
    local = mlp_model()
    local_report = compress(local, batches, recipe, quiet=True)
    remote = mlp_model()
    remote_report = compress(remote, batches, recipe, quiet=True, executor=ray_executor(), hessian_memory=4_327_000)
    assert remote_report.passes == 1 + 3 and local_report.passes == 1
    assert_state_equal(remote, local)
    assert_reports_equal(remote_report, local_report)


@ray_warnings
def test_ray_calibration_shards_give_bit_identical_hessians(ray_cluster):
    model = TinyCNN().eval()
    batches = [torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    infos = find_layers(model)
    local = LocalExecutor().calibrate(model, infos, batches, device=model_device(model), counter=_Applications)
    for shards in (2, 3):
        executor = ray_executor(calibration_tasks=shards)
        executor.start(quiet=True)
        try:
            remote = executor.calibrate(model, infos, batches, device=model_device(model), counter=_Applications)
        finally:
            executor.close()
        assert remote.order == local.order and remote.batches == local.batches
        assert remote.applications == local.applications
        for name in infos:
            assert remote.hessians[name].n == local.hessians[name].n
            for mine, theirs in zip(remote.hessians[name].hessians(), local.hessians[name].hessians()):
                assert np.array_equal(mine, theirs), name


@ray_warnings
@pytest.mark.parametrize("sequential", [False, True])
def test_ray_compress_is_bit_identical_to_a_local_run(ray_cluster, sequential):
    recipe = {
        "default": {"prune": "nm", "n": 2, "m": 4, "bits": 4},
        "overrides": [{"pattern": "layers.1", "prune": "unstructured", "sparsity": 0.5, "bits": None}],
    }
    batches = mlp_batches()
    local = mlp_model()
    local_report = compress(local, batches, recipe, sequential=sequential, quiet=True)
    remote = mlp_model()
    remote_report = compress(remote, batches, recipe, sequential=sequential, quiet=True, executor=ray_executor())
    assert_state_equal(remote, local)
    assert_reports_equal(remote_report, local_report)


class SharedInput(nn.Module):
    """q, k and v read the same tensor: a local dense run accumulates their Hessian once."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, 4)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        q, k, v = self.q(h), self.k(h), self.v(h)
        return self.out(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)


@ray_warnings
@pytest.mark.parametrize("sequential", [False, True])
def test_ray_compress_of_layers_sharing_an_input_is_bit_identical(ray_cluster, sequential):
    """The local run shares one Hessian between q, k and v (and in sequential mode one pass);
    the Ray shards accumulate each layer on its own: the same bits."""
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 5, 8, generator=generator) for _ in range(4)]
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(SharedInput())
    local_report = compress(models[0], batches, LayerConfig(bits=4), sequential=sequential, quiet=True)
    remote_report = compress(
        models[1], batches, LayerConfig(bits=4), sequential=sequential, quiet=True, executor=ray_executor()
    )
    assert_state_equal(models[1], models[0])
    assert_reports_equal(remote_report, local_report)


@ray_warnings
def test_ray_survives_a_worker_killed_mid_task(ray_cluster, tmp_path, capsys):
    """The first attempt of a row task kills its worker process; Ray retries it on a new worker
    and the result is the same."""
    marker = str(tmp_path / "killed")

    def kill_first_attempt(layer, first_row, marker=marker):
        if layer == "layers.0" and first_row > 0 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)

    batches = mlp_batches()
    config = LayerConfig(prune="nm", n=2, m=4, bits=4)
    local = mlp_model()
    compress(local, batches, config, quiet=True)
    remote = mlp_model()
    compress(remote, batches, config, executor=ray_executor(task_hook=kill_first_attempt))
    assert os.path.exists(marker)  # a worker did die
    assert_state_equal(remote, local)
    # one bar over all tasks (calibration 2, layers.0 three row ranges, layers.1 and .2 one each)
    progress = capsys.readouterr().err
    assert "obc tasks" in progress and "7/7" in progress and "layers 3/3" in progress


@ray_warnings
def test_ray_worker_lost_on_every_attempt_names_the_layer(ray_cluster):
    """Every attempt of a row task of layers.1 kills its worker (as the out-of-memory killer would):
    was Ray's own WorkerCrashedError, which names neither the layer nor max_retries."""
    from obc_native.torch.ray_executor import RayWorkerLostError

    def always_die(layer, first_row):
        if layer == "layers.1":
            os._exit(1)

    model = mlp_model()
    before = copy.deepcopy(model)
    with pytest.raises(RayWorkerLostError, match=r"a task of layer 'layers.1' lost its worker on each of its 2 "
                                                 r"attempt\(s\).*max_retries"):
        compress(model, mlp_batches(), LayerConfig(prune="nm", n=2, m=4), quiet=True,
                 executor=ray_executor(task_hook=always_die, max_retries=1))
    assert_state_equal(model, before)


@ray_warnings
def test_ray_build_database_and_budget_are_bit_identical(ray_cluster):
    batches = mlp_batches()
    levels = {"sparsities": [0.25, 0.5], "nm": [[2, 4]]}
    local_db = build_database(mlp_model(), batches, levels, quiet=True)
    remote_db = build_database(mlp_model(), batches, levels, quiet=True, executor=ray_executor())
    assert local_db.to_dict() == remote_db.to_dict()
    local = mlp_model()
    compress(local, batches, budget="params=1.6x", levels=levels, quiet=True)
    remote = mlp_model()
    compress(remote, batches, budget="params=1.6x", levels=levels, quiet=True, executor=ray_executor())
    assert_state_equal(remote, local)


@ray_warnings
def test_ray_padded_token_batches_are_bit_identical(ray_cluster):
    """Padded token batches with their attention masks: the shards leave out the same padding
    positions as a local run (which also shares q/k/v's Hessian): the same bits, and a bad mask
    in a later shard is named by its number in the whole calibration set."""
    pytest.importorskip("transformers")
    from obc_native.torch.hessian import CalibrationError
    from test_token_mask import LENGTHS, padded_batches, tiny_bert

    batches = padded_batches(per_batch=2)  # 4 batches in 2 shards
    local = tiny_bert()
    local_report = compress(local, batches, LayerConfig(bits=4), quiet=True)
    remote = tiny_bert()
    remote_report = compress(
        remote, batches, LayerConfig(bits=4), quiet=True, executor=ray_executor(calibration_tasks=2)
    )
    assert_state_equal(remote, local)
    assert_reports_equal(remote_report, local_report)
    samples = {row.name: row.samples for row in remote_report.compressed}
    assert samples == {row.name: row.samples for row in local_report.compressed}
    assert samples.pop("pooler.dense") == len(LENGTHS) and set(samples.values()) == {sum(LENGTHS)}
    executor = ray_executor(calibration_tasks=2)  # the option reaches the shards: off, every position
    executor.start(quiet=True)
    try:
        model = tiny_bert()
        infos = {name: info for name, info in find_layers(model).items() if name != "pooler.dense"}
        whole = executor.calibrate(model, infos, batches, device=model_device(model), token_mask=None)
    finally:
        executor.close()
    assert {stats.n for stats in whole.hessians.values()} == {sum(b["input_ids"].numel() for b in batches)}
    batches[3] = {**batches[3], "attention_mask": batches[3]["attention_mask"] * 2}
    with pytest.raises(CalibrationError, match="calibration batch 3: .*only 0 and 1"):
        compress(tiny_bert(), batches, LayerConfig(bits=4), quiet=True, executor=ray_executor(calibration_tasks=2))


@ray_warnings
def test_ray_solver_errors_surface_unchanged(ray_cluster):
    model = mlp_model()
    before = copy.deepcopy(model)
    with pytest.raises(compress_module.CompressionError, match="layer 'layers.0': H is not positive definite"):
        # 2 samples of 16 inputs: a singular Hessian, and no damping
        compress(model, [torch.randn(2, 16)], LayerConfig(prune="nm", n=2, m=4, damp=0.0), quiet=True,
                 executor=ray_executor())
    assert_state_equal(model, before)


# ---- the command line


def _cli_files(tmp_path):
    from obc_native.demo.model import load_data

    calibration = tmp_path / "calib.pt"
    torch.save(load_data().train_x[:64].clone(), calibration)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("default: {prune: nm, n: 2, m: 4, bits: 4}\nskip: [features.0]\n")
    return ["compress", "--model", _weights_path(), "--arch", "obc_native.demo.model:DigitsCNN",
            "--calibration", str(calibration), "--recipe", str(recipe), "--quiet"]


def _weights_path():
    from obc_native.demo.model import WEIGHTS_PATH

    return WEIGHTS_PATH


def test_cli_unreachable_ray_address_is_one_error_line(tmp_path, capsys):
    pytest.importorskip("ray")
    from obc_native.cli import main

    out = tmp_path / "out"
    assert main([*_cli_files(tmp_path), "--out", str(out), "--ray", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"obc-native: error: --ray 127.0.0.1:1: Ray cluster at '127.0.0.1:1' is unreachable: {err[0].split(': ')[-1]}"]
    assert not out.exists()
    assert main([*_cli_files(tmp_path), "--out", str(out), "--checkpoint", str(tmp_path / "calib.pt")]) == 1
    assert "--checkpoint" in capsys.readouterr().err


@ray_warnings
def test_cli_ray_and_checkpoint_save_the_local_result(ray_cluster, tmp_path):
    from obc_native.cli import main
    from obc_native.demo.model import DigitsCNN
    from obc_native.torch import load_compressed

    base = _cli_files(tmp_path)
    assert main([*base, "--out", str(tmp_path / "local")]) == 0
    assert main([*base, "--out", str(tmp_path / "ray"), "--ray", "--checkpoint", str(tmp_path / "ckpt")]) == 0
    assert len([f for f in os.listdir(tmp_path / "ckpt") if f.startswith("layer-")]) == 3
    local, remote = DigitsCNN(), DigitsCNN()
    load_compressed(local, tmp_path / "local")
    load_compressed(remote, tmp_path / "ray")
    assert_state_equal(remote, local)
