"""Training-step cost of the F5C network: parameters, FLOPs, throughput per precision, peak memory, F5C's share,
and what each speed lever buys.

For each network (``lite``; ``lite-v1``, the ``lite`` of before its flow head stopped at 1/4 resolution; ``mol``)
at batch 8, T=8, 128x128 on the chosen device: parameters; FLOPs per clip for the forward pass and for a whole
training step (torch's FLOP counter); clips/s for forward + backward + Adam step in each precision (fp32, and
bf16 autocast where the device computes bf16 natively: elsewhere it is recorded as skipped, with the measured
bf16 matmul rate that says why); peak memory; and, measured in the same run, the device's dense matmul FLOP/s
per precision, so each throughput also reads as achieved/peak. F5C's own operations (both blocks' FCC and CCC,
forward and backward) are timed alone on the step's shapes to give their share of the step. Each network runs
in a fresh process so peak memory is its own.

``levers`` then times the candidate speed-ups against each other in one process, alternating steps so that
other jobs on the machine slow every variant alike (median of ``--rounds`` rounds): the flow head's output
stride, channels-last memory layout, a fused Adam, one thread against all, and with ``--compile``
``torch.compile`` (its compile time counted separately: it is paid once per process, that is once per site
and round in a federation).

    .venv/bin/python benchmarks/model_step.py [--device cuda] [--steps 10] [--rounds 5] [--compile] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from client.runtime import THREAD_ENV, apply_thread_env

apply_thread_env()  # measure with the settings the fedmer command uses

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from client.precision import autocast, native_bf16  # noqa: E402
from models import ModelConfig, MultitaskLoss, build_model, preset  # noqa: E402
from models.config import FlowHeadConfig  # noqa: E402

BATCH, FRAMES, SIZE = 8, 8, 128
LITE_V1 = "lite-v1 (full-resolution flow decoder)"


def network(name: str) -> ModelConfig:
    """A preset at the benchmark's shapes; ``lite-v1`` is ``lite`` with the full-resolution flow decoder it had
    before (stages 48, 32, 16 up to full resolution), the baseline of the flow head's speed-up."""
    if name == "lite-v1":
        return preset(
            "lite", image_size=SIZE, frames=FRAMES, flow=FlowHeadConfig(decoder=(48, 32, 16), output_stride=1)
        )
    return preset(name, image_size=SIZE, frames=FRAMES)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 10) -> float:
    """Dense matmul FLOP/s in ``dtype``: the machine's practical peak for this kind of work."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronise(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronise(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def make_batch(config, device: torch.device, size_of_batch: int = BATCH) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t, size, n = config.frames, config.image_size, size_of_batch
    batch = {
        "clip": torch.rand(n, t, 1, size, size, generator=g),
        "flow": torch.randn(n, t - 1, 2, size, size, generator=g),
        "landmarks": 0.3 + 0.4 * torch.rand(n, t, 68, 2, generator=g),
        "label": torch.randint(0, config.num_classes, (n,), generator=g),
        "au": (torch.rand(n, 12, generator=g) > 0.7).float(),
        "au_mask": torch.ones(n, dtype=torch.bool),
    }
    return {name: value.to(device) for name, value in batch.items()}


def step_function(model, batch, device, dtype: torch.dtype | None = None, fused: bool | None = None):
    """One training step as ``client.training.train_epoch`` takes it: autocast forward, fp32 loss, Adam."""
    loss_fn = MultitaskLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(dtype, device):
            output = model(batch["clip"], batch["landmarks"], prior_weight=0.5)
        total, _ = loss_fn(output.float(), batch)
        total.backward()
        optimizer.step()

    return step


def time_it(function, device: torch.device, steps: int, warmup: int = 2) -> float:
    """Seconds per call after warm-up."""
    for _ in range(warmup):
        function()
    synchronise(device)
    start = time.perf_counter()
    for _ in range(steps):
        function()
    synchronise(device)
    return (time.perf_counter() - start) / steps


def f5c_seconds(model, device: torch.device, steps: int) -> float:
    """Both F5C blocks (FCC + CCC), forward and backward, on the step's B*(T-1) feature maps each."""
    backbone = model.backbone
    c, s = model.config.channels, model.config.feature_size
    x = torch.randn(BATCH * (FRAMES - 1), c, s, s, device=device, requires_grad=True)

    def run() -> None:
        (backbone.block1(x).sum() + backbone.block2(x).sum()).backward()

    return time_it(run, device, steps)


def count_flops(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def top_operators(step, limit: int = 12) -> list[dict]:
    """Where the step's time goes, by self time per operator (torch profiler)."""
    with torch.profiler.profile() as profiler:
        step()
    rows = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:limit]
    total = sum(e.self_cpu_time_total for e in profiler.key_averages())
    return [{"op": e.key, "self_share": round(e.self_cpu_time_total / total, 4), "calls": e.count} for e in rows]


def precision_result(step_flops: float, seconds: float, peak: float) -> dict:
    return {
        "step_seconds": round(seconds, 4),
        "clips_per_second": round(BATCH / seconds, 3),
        "achieved_gflops": round(step_flops * BATCH / seconds / 1e9, 2),
        "matmul_peak_gflops": round(peak / 1e9, 2),
        "achieved_over_peak": round(step_flops * BATCH / seconds / peak, 4),
    }


def measure(name: str, device_name: str, steps: int, queue) -> None:
    torch.manual_seed(0)
    device = torch.device(device_name)
    config = network(name)
    model = build_model(config).to(device)
    batch = make_batch(config, device)
    step = step_function(model, batch, device)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_seconds = time_it(step, device, steps)
    peak_bytes = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) * 1024
    )
    one = {k: v[:1] for k, v in batch.items()}
    forward_flops = count_flops(lambda: model(one["clip"], one["landmarks"]))
    step_flops = count_flops(step) / BATCH
    f5c = f5c_seconds(model, device, steps)
    precisions = {"fp32": precision_result(step_flops, step_seconds, matmul_flops(device))}
    # emulated bf16 is so slow that a 2048-wide matmul takes minutes: a 512-wide one still gives its rate
    bf16_peak = matmul_flops(device, torch.bfloat16, n=2048 if native_bf16(device) else 512, repeats=2)
    if native_bf16(device):
        bf16_seconds = time_it(step_function(model, batch, device, torch.bfloat16), device, steps)
        precisions["bf16"] = precision_result(step_flops, bf16_seconds, bf16_peak)
    else:
        precisions["bf16"] = {
            "skipped": "no native bf16 (AVX512-BF16, AMX or a bf16 GPU): client.precision falls back to fp32",
            "matmul_peak_gflops": round(bf16_peak / 1e9, 2),
        }
    queue.put(
        {
            "preset": name,
            "ccc_graph": config.ccc_graph,
            "flow_output_stride": config.flow.output_stride,
            "parameters": sum(p.numel() for p in model.parameters()),
            "forward_gflops_per_clip": round(forward_flops / 1e9, 3),
            "train_step_gflops_per_clip": round(step_flops / 1e9, 3),
            **precisions["fp32"],
            "precisions": precisions,
            "peak_memory_mib": round(peak_bytes / 2**20, 1),
            "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS growth",
            "f5c_seconds": round(f5c, 4),
            "f5c_share_of_step": round(f5c / step_seconds, 4),
            "top_operators": top_operators(step) if name == "lite" else [],
        }
    )


# ----------------------------------------------------------------------------------------------- levers


def make_step(
    name: str, device: torch.device, layout: bool = False, fused: bool | None = None, compiled: bool = False
) -> Callable[[], None]:
    """A ready training step of a fresh network (seed 0, the benchmark's batch), with the lever applied."""
    torch.manual_seed(0)
    config = network(name)
    model = build_model(config).to(device)
    batch = make_batch(config, device)
    if layout:
        model = model.to(memory_format=torch.channels_last_3d)
        frames = batch["clip"].transpose(1, 2).contiguous(memory_format=torch.channels_last_3d)
        batch["clip"] = frames.transpose(1, 2)
    return step_function(torch.compile(model) if compiled else model, batch, device, fused=fused)


def lever_steps(device: torch.device, compile_model: bool) -> dict[str, Callable[[], None]]:
    """Each candidate as a ready training step of its own model (same seed, same batch)."""
    steps = {
        LITE_V1: make_step("lite-v1", device),
        "lite (flow at 1/4, upsampled)": make_step("lite", device),
        "lite, channels-last": make_step("lite", device, layout=True),
        "lite, fused Adam": make_step("lite", device, fused=True),
    }
    if compile_model:
        steps["lite, torch.compile"] = make_step("lite", device, compiled=True)
    return steps


WAIT_POLICIES: dict[str, tuple[str, dict[str, str | None]]] = {  # name: (network, environment)
    "lite-v1, OpenMP's default wait (the step before)": ("lite-v1", {"OMP_WAIT_POLICY": None}),
    "lite, OpenMP's default wait (spinning)": ("lite", {"OMP_WAIT_POLICY": None}),
    "lite, passive wait (fedmer's setting)": ("lite", {"OMP_WAIT_POLICY": "PASSIVE"}),
    "lite, one thread": ("lite", {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}),
}


def step_worker(name: str) -> None:
    """``--step-worker NAME``: build that network, then run one step per line on stdin and print its seconds."""
    step = make_step(name, torch.device("cpu"))
    step()
    print("ready", flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        step()
        print(time.perf_counter() - start, flush=True)


def worker_env(settings: dict[str, str | None]) -> dict[str, str]:
    """This process's environment with ``settings`` applied (None removes the variable)."""
    env = {key: value for key, value in os.environ.items() if settings.get(key, value) is not None}
    env.update({key: value for key, value in settings.items() if value is not None})
    return env


def measure_wait_policies(rounds: int) -> dict:
    """OpenMP reads its settings once per process, so each policy gets a worker process of its own; the workers
    take turns, one step each, so that other jobs on the machine load them alike."""
    workers = {
        name: subprocess.Popen(
            [sys.executable, __file__, "--step-worker", network_name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=worker_env(env),
        )
        for name, (network_name, env) in WAIT_POLICIES.items()
    }
    seconds: dict[str, list[float]] = {name: [] for name in workers}
    try:
        for worker in workers.values():
            if worker.stdout.readline().strip() != "ready":
                raise RuntimeError("a step worker failed to start")
        for _ in range(rounds):
            for name, worker in workers.items():
                worker.stdin.write("step\n")
                worker.stdin.flush()
                seconds[name].append(float(worker.stdout.readline()))
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    return {
        name: {"network": WAIT_POLICIES[name][0], "settings": WAIT_POLICIES[name][1], **lever_times(times)}
        for name, times in seconds.items()
    }


def lever_times(times: list[float]) -> dict:
    median = statistics.median(times)
    return {
        "median_step_seconds": round(median, 4),
        "clips_per_second": round(BATCH / median, 3),
        "rounds": [round(t, 3) for t in times],
    }


def measure_levers(device: torch.device, rounds: int, compile_model: bool) -> dict:
    """Median seconds per step of every lever, alternating variants within each round."""
    steps = lever_steps(device, compile_model)
    first_call = {}
    for name, step in steps.items():  # warm-up; the first call of a compiled model compiles it
        start = time.perf_counter()
        step()
        synchronise(device)
        first_call[name] = time.perf_counter() - start
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            synchronise(device)
            seconds[name].append(time.perf_counter() - start)
    return {
        name: {**lever_times(times), "first_call_seconds": round(first_call[name], 2)}
        for name, times in seconds.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--presets", default="lite,lite-v1,mol")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of the lever comparison (0: none)")
    parser.add_argument("--compile", action="store_true", help="include torch.compile among the levers")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--step-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step_worker:
        step_worker(args.step_worker)
        return
    device = torch.device(args.device)
    out = args.out or Path(__file__).parent / "results" / f"model_step_{device.type}.json"
    context = multiprocessing.get_context("spawn")
    results = []
    for name in args.presets.split(","):
        queue = context.Queue()
        process = context.Process(target=measure, args=(name, args.device, args.steps, queue))
        process.start()
        results.append(queue.get())
        process.join()
        print(json.dumps({k: v for k, v in results[-1].items() if k != "top_operators"}), flush=True)
    levers = measure_levers(device, args.rounds, args.compile) if args.rounds else {}
    if args.rounds and device.type == "cpu":
        levers.update(measure_wait_policies(args.rounds))
    if levers:
        baseline = levers[LITE_V1]["median_step_seconds"]
        for lever in levers.values():
            lever["speed_vs_lite_v1"] = round(baseline / lever["median_step_seconds"], 3)
    for name, lever in levers.items():
        print(f"{name}: {lever['clips_per_second']} clips/s, {lever['speed_vs_lite_v1']}x lite-v1", flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {
        "batch": BATCH,
        "frames": FRAMES,
        "image_size": SIZE,
        "device": device_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "cpu_native_bf16": native_bf16("cpu"),
        "thread_env": {key: os.environ.get(key) for key in THREAD_ENV},
        "results": results,
        "levers": levers,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
