"""Training-step cost of the F5C network: parameters, FLOPs, throughput, peak memory, F5C's share.

For each preset (``lite``, ``mol``) at batch 8, T=8, 128x128 on the chosen device: parameters; FLOPs
per clip for the forward pass and for a whole training step (torch's FLOP counter); clips/s for
forward + backward + Adam step; peak memory; and, measured in the same run, the machine's dense fp32
matmul FLOP/s, so each throughput also reads as achieved/peak. F5C's own operations (both blocks' FCC
and CCC, forward and backward) are timed alone on the step's shapes to give their share of the step.
Each preset runs in a fresh process so peak memory is its own.

    .venv/bin/python benchmarks/model_step.py [--device cuda] [--steps 10] [--out benchmarks/results/...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from models import MultitaskLoss, build_model, preset

BATCH, FRAMES, SIZE = 8, 8, 128


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """Dense fp32 matmul FLOP/s: the machine's practical peak for this kind of work."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
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


def step_function(model, batch, device):
    loss_fn = MultitaskLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        total, _ = loss_fn(model(batch["clip"], batch["landmarks"], prior_weight=0.5), batch)
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


def measure(name: str, device_name: str, steps: int, queue) -> None:
    torch.manual_seed(0)
    device = torch.device(device_name)
    config = preset(name, image_size=SIZE, frames=FRAMES)
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
    peak = matmul_flops(device)
    queue.put(
        {
            "preset": name,
            "ccc_graph": config.ccc_graph,
            "parameters": sum(p.numel() for p in model.parameters()),
            "forward_gflops_per_clip": round(forward_flops / 1e9, 3),
            "train_step_gflops_per_clip": round(step_flops / 1e9, 3),
            "step_seconds": round(step_seconds, 4),
            "clips_per_second": round(BATCH / step_seconds, 3),
            "achieved_gflops": round(step_flops * BATCH / step_seconds / 1e9, 2),
            "matmul_peak_gflops": round(peak / 1e9, 2),
            "achieved_over_peak": round(step_flops * BATCH / step_seconds / peak, 4),
            "peak_memory_mib": round(peak_bytes / 2**20, 1),
            "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS growth",
            "f5c_seconds": round(f5c, 4),
            "f5c_share_of_step": round(f5c / step_seconds, 4),
            "top_operators": top_operators(step) if name == "lite" else [],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--presets", default="lite,mol")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
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
        print(json.dumps({k: v for k, v in results[-1].items() if k != "top_operators"}))
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
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
