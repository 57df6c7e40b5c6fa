"""Data-parallel training on CPU (gloo, 2 processes spawned by the test): the batch order, quantizer state identical on
every rank for every registered quantizer and a plugin, a 2-process SyncBN run equal to a 1-process run, resume."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import quantizers
from quantbench.config import TrainConfig
from quantbench.training import distributed
from quantbench.training.distributed import Context, EpochSampler, GlobalBatchNorm, epoch_order
from quantbench.training.run import train
from tests.helpers import REPO, subprocess_env

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(worker, *args) -> None:
    port = _free_port()
    mp.spawn(worker, args=(port, *args), nprocs=WORLD, join=True)


def _join(rank: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


# ---- the batch order -----------------------------------------------------------------------------------------------


def test_epoch_order_is_the_shuffled_dataloaders_order() -> None:
    """The sampler reproduces ``DataLoader(shuffle=True, generator=seeded)`` on this torch, so runs keep their numbers."""
    dataset = TensorDataset(torch.arange(103))
    for seed in (0, 7 * 100_003 + 2):
        loader = DataLoader(dataset, batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(seed))
        assert [int(batch[0]) for batch in loader] == epoch_order(103, seed)


def test_ranks_split_each_global_batch_of_the_single_process_order() -> None:
    dataset = TensorDataset(torch.arange(50))
    single = EpochSampler(dataset, batch_size=8, seed=3, context=Context())
    ranks = [EpochSampler(dataset, batch_size=8, seed=3, context=Context(rank, WORLD, rank)) for rank in range(WORLD)]
    for sampler in (single, *ranks):
        sampler.set_epoch(2)
    order, shards = list(single), [list(sampler) for sampler in ranks]
    assert len(order) == 48 and all(len(shard) == 24 for shard in shards)  # 6 full global batches
    for batch in range(6):
        global_batch = order[batch * 8:(batch + 1) * 8]
        assert shards[0][batch * 4:(batch + 1) * 4] + shards[1][batch * 4:(batch + 1) * 4] == global_batch


def test_a_global_batch_that_does_not_divide_over_the_ranks_is_one_line() -> None:
    with pytest.raises(Exception, match="must divide evenly over 2 processes"):
        EpochSampler(TensorDataset(torch.arange(10)), batch_size=5, seed=0, context=Context(0, 2, 0))


# ---- quantizer state on every rank ---------------------------------------------------------------------------------


class RankLocalPlugin(quantizers.Quantizer):
    """A plugin with LSQ-like learning and no DDP awareness of its own."""

    def __init__(self, bits: int, signed: bool, role: str | None = None) -> None:
        super().__init__(bits, signed, role)
        self.step_size = nn.Parameter(torch.tensor(1.0))

    def quantize(self, v: torch.Tensor) -> torch.Tensor:
        step = quantizers.scale_grad(self.step_size, 0.01)
        return quantizers.round_ste(torch.clamp(v / step, -self.qn, self.qp)) * step

    def apply_step(self, step: float) -> None:
        with torch.no_grad():
            self.step_size.fill_(step)

    def levels(self) -> torch.Tensor:
        return torch.arange(-self.qn, self.qp + 1, device=self.step_size.device) * self.step_size.detach()


def _identity_worker(rank: int, port: int, out: str, names: list[str]) -> None:
    _join(rank, port)
    if "rank_local_plugin" not in quantizers.available():
        quantizers.register("rank_local_plugin")(RankLocalPlugin)
    for name in names:
        train(TrainConfig(quantizer=name, bits=2, epochs=1, max_train_batches=3, batch_size=64, device="cpu",
                          out=f"{out}/{name}"), progress=False)
    dist.destroy_process_group()


def test_every_quantizer_and_a_plugin_have_identical_state_on_every_rank(tmp_path: Path) -> None:
    """Data-driven init on each rank's own shard would give each rank its own step: quantbench's rule prevents it."""
    # the built-ins a fresh process has (other tests register plugins in this one), and a plugin of our own
    builtins = [name for name in quantizers.available() if quantizers.get(name).__module__.startswith("quantizers.")]
    names = [*builtins, "rank_local_plugin"]
    _spawn(_identity_worker, str(tmp_path), names)
    for name in names:
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["world_size"] == WORLD
        assert metrics["quantizer_state_identical_across_ranks"] is True, name


def _divergent_worker(rank: int, port: int, result: str) -> None:
    _join(rank, port)
    model = nn.Sequential(quantizers.create("lsq", bits=2, signed=True))
    model(torch.randn(16) * (rank + 1))  # each rank initializes from its own data: the failure mode
    context = Context(rank, WORLD, rank)
    before = distributed.ranks_agree(model, context)
    distributed.broadcast_state(model, context)
    after = distributed.ranks_agree(model, context)
    if rank == 0:
        Path(result).write_text(json.dumps([before, after]))
    dist.destroy_process_group()


def test_the_rank_check_catches_divergent_state_and_broadcast_repairs_it(tmp_path: Path) -> None:
    _spawn(_divergent_worker, str(tmp_path / "result.json"))
    assert json.loads((tmp_path / "result.json").read_text()) == [False, True]


# ---- 2 processes with SyncBN equal 1 process -------------------------------------------------------------------------


def _equivalence_worker(rank: int, port: int, configs: list[dict]) -> None:
    _join(rank, port)
    for config in configs:
        train(TrainConfig(**config), progress=False)
    dist.destroy_process_group()


def _relative_differences(one: Path, two: Path, suffix: str = "") -> dict[str, float]:
    first, second = (torch.load(run / "model.pt", weights_only=True) for run in (one, two))
    return {key: float((second[key] - first[key]).abs().max() / first[key].abs().max().clamp_min(1e-12))
            for key in first if key.endswith(suffix) and first[key].is_floating_point()}


def test_two_processes_with_sync_bn_match_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    """Global batch 128 on 2 ranks (64 each, SyncBN, global N for LSQ) against 128 on one process, same seed.

    The machinery is exact up to float32 summation order (full precision: every tensor within 1e-4). Quantized runs
    start from that noise and amplify it whenever a value sits on a rounding boundary (a code flips), the more so
    the fewer the bits: measured on digits, steps agree to ~3e-6 after an 8-bit epoch, ~1e-4 after one 2-bit step,
    ~1e-3 after a 2-bit epoch. So the issue's bounds (steps 1e-4, top-1 0.5 points) are asserted at 8 bits.
    """
    fp = tmp_path / "fp"
    train(TrainConfig(epochs=2, device="cpu", out=str(fp)), progress=False)
    common = dict(init_from=str(fp), batch_size=128, device="cpu", sync_bn=True)
    recipes = {"fp": dict(epochs=1, max_train_batches=3, lr=0.01),
               "lsq8": dict(quantizer="lsq", bits=8, epochs=1),
               "lsq2-one-step": dict(quantizer="lsq", bits=2, epochs=1, max_train_batches=1)}
    for name, recipe in recipes.items():
        train(TrainConfig(**common, **recipe, out=str(tmp_path / f"{name}-1")), progress=False)
    _spawn(_equivalence_worker, [{**common, **recipe, "out": str(tmp_path / f"{name}-2")}
                                 for name, recipe in recipes.items()])

    two = json.loads((tmp_path / "lsq8-2" / "metrics.json").read_text())
    assert two["world_size"] == 2 and json.loads((tmp_path / "lsq8-2" / "config.json").read_text())["world_size"] == 2
    assert max(_relative_differences(tmp_path / "fp-1", tmp_path / "fp-2").values()) <= 1e-4
    steps = _relative_differences(tmp_path / "lsq8-1", tmp_path / "lsq8-2", "step_size")
    assert steps and max(steps.values()) <= 1e-4, steps
    one = json.loads((tmp_path / "lsq8-1" / "metrics.json").read_text())
    assert abs(one["top1"] - two["top1"]) <= 0.5
    steps = _relative_differences(tmp_path / "lsq2-one-step-1", tmp_path / "lsq2-one-step-2", "step_size")
    assert max(steps.values()) <= 1e-3, steps


def _batchnorm_worker(rank: int, port: int, result: str) -> None:
    _join(rank, port)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    weight = torch.randn(3)
    norm = GlobalBatchNorm(3)
    with torch.no_grad():
        norm.weight.copy_(weight)
    shard = x[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    out = norm(shard)
    (out * torch.arange(out.numel()).view_as(out)).sum().backward()
    dist.all_reduce(norm.weight.grad)  # what DDP does with a parameter's gradient (up to its mean over ranks)
    gathered = [torch.empty_like(shard) for _ in range(WORLD)]
    dist.all_gather(gathered, shard.grad)
    outs = [torch.empty_like(out) for _ in range(WORLD)]
    dist.all_gather(outs, out.detach())
    if rank == 0:
        torch.save({"out": torch.cat(outs), "grad": torch.cat(gathered), "running_var": norm.running_var,
                    "weight_grad": norm.weight.grad}, result)
    dist.destroy_process_group()


def test_global_batchnorm_on_two_ranks_is_batchnorm_on_the_whole_batch(tmp_path: Path) -> None:
    _spawn(_batchnorm_worker, str(tmp_path / "bn.pt"))
    got = torch.load(tmp_path / "bn.pt", weights_only=True)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    weight = torch.randn(3)
    norm = nn.BatchNorm2d(3)
    with torch.no_grad():
        norm.weight.copy_(weight)
    leaf = x.clone().requires_grad_(True)
    out = norm(leaf)
    upstream = torch.cat([torch.arange(out[:4].numel()).view_as(out[:4])] * 2).float()
    (out * upstream).sum().backward()
    torch.testing.assert_close(got["out"], out.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["grad"], leaf.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["running_var"], norm.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["weight_grad"], norm.weight.grad, rtol=1e-4, atol=1e-3)


# ---- torchrun, killed and resumed ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_two_process_torchrun_resumes_to_completion(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "quantbench", "train", "--quantizer", "lsq", "--bits", "2", "--epochs", "3", "--device", "cpu",
               "--batch-size", "64", "--out", str(out)]
    env = subprocess_env({"OMP_NUM_THREADS": "1"})
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 240
    while not (out / "epochs.csv").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()
    resumed = subprocess.run([*command, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["world_size"] == 2
    assert len((out / "epochs.csv").read_text().strip().splitlines()) == 1 + 3


@pytest.mark.slow
def test_compare_runs_each_cell_as_a_two_process_job(tmp_path: Path) -> None:
    from quantbench.comparison.compare import build_config, run_compare

    config = build_config(None, {"quantizers": "lsq", "bits": [2], "seeds": [0], "fp_epochs": 1, "epochs": 1,
                                 "max_train_batches": 2, "nproc_per_node": 2, "device": "cpu",
                                 "out": str(tmp_path / "grid")})
    results = run_compare(config, progress=False)
    assert sorted(results.run) == ["fp-seed0", "lsq-2bit-seed0"]
    for run in ("fp/seed0", "runs/lsq-2bit-seed0"):
        assert json.loads((tmp_path / "grid" / run / "metrics.json").read_text())["world_size"] == 2
    assert (tmp_path / "grid" / "runs" / "lsq-2bit-seed0" / "launch" / "torchrun.log").is_file()
    with pytest.raises(Exception, match="nproc-per-node must be an integer"):
        build_config(None, {"nproc_per_node": 0})
