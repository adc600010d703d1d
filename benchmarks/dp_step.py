"""Cost of differential privacy per training step: DP-SGD step time over the plain step time, per Opacus mode.

The ``lite`` network at batch 16, T=8, 128x128 random clips with valid targets (``model_step.make_batch``),
forward + multitask loss + backward + Adam step, a few warm-up steps then timed ones, for the plain model and
for each per-sample gradient mode of ``client.privacy`` (``ghost``: two backward passes, norms only;
``hooks``/``functorch``: per-sample gradients stored, then clipped). Each runs in a fresh process so its
peak memory (process max RSS growth over the step loop) is its own. The ratio is what matters: the machine
may be shared, so each DP step alternates with a plain step in the same process (load from other jobs then
slows both alike) and the ratio is taken there; the load average before and after, and torch's threads, go
in the JSON too. The plain-only process gives the plain step's own time and peak memory.

    nice -n 19 .venv/bin/python benchmarks/dp_step.py [--modes ghost,hooks,functorch] [--steps 3] [--out ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import resource
import statistics
import warnings
from pathlib import Path

import torch
from federation_overhead import machine_load
from model_step import make_batch, step_function, time_it
from torch.utils.data import DataLoader, TensorDataset

from client.privacy import MODES, PrivacySettings, make_private
from models import MultitaskLoss, build_model, preset

BATCH, FRAMES, SIZE = 16, 8, 128
# Opacus's backward hooks fire on modules whose inputs (the clips) need no gradient: expected, not a problem
warnings.filterwarnings("ignore", message="Full backward hook is firing")
PLAIN = "none"


def private_step(model, loss_fn: MultitaskLoss, batch: dict[str, torch.Tensor], mode: str):
    """DP-SGD as a site runs it (noise 1, clip 1); the batch is fed directly, so no Poisson loader."""
    settings = PrivacySettings(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, mode=mode)
    loader = DataLoader(TensorDataset(torch.zeros(BATCH)), batch_size=BATCH)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    private = make_private(model, optimizer, loader, settings, loss_fn=loss_fn, noise_multiplier=1.0)

    def step() -> None:
        private.optimizer.zero_grad(set_to_none=True)
        loss, _ = private.loss(private.model(batch["clip"], batch["landmarks"], prior_weight=0.5), batch)
        loss.backward()
        private.optimizer.step()

    return step


def peak_mib_since(baseline_kb: int) -> float:
    return round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024, 1)


def measure(mode: str, steps: int, warmup: int, queue) -> None:
    """One mode in a fresh process. A DP mode's steps alternate with plain steps on a copy of the model, so
    that load from other jobs slows both alike and the ratio is taken within the process."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    config = preset("lite", image_size=SIZE, frames=FRAMES)
    model, loss_fn = build_model(config), MultitaskLoss()
    batch = make_batch(config, device, BATCH)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == PLAIN:
        seconds = time_it(step_function(model, batch, device), device, steps, warmup)
        peak = peak_mib_since(baseline_kb)
        queue.put({"mode": mode, "runs": True, "step_seconds": round(seconds, 3), "peak_memory_mib": peak})
        return
    plain = step_function(copy.deepcopy(model), batch, device)
    try:
        private = private_step(model, loss_fn, batch, mode)
        for _ in range(warmup):
            private()
    except Exception as error:  # a mode that cannot train the model is a result, not a crash
        queue.put({"mode": mode, "runs": False, "error": f"{type(error).__name__}: {error}"[:500]})
        return
    peak = peak_mib_since(baseline_kb)  # before the plain steps; a DP step needs more memory than a plain one
    for _ in range(warmup):
        plain()
    pairs = [(time_it(plain, device, 1, 0), time_it(private, device, 1, 0)) for _ in range(steps)]
    plain_seconds, private_seconds = (statistics.mean(times) for times in zip(*pairs, strict=True))
    queue.put(
        {
            "mode": mode,
            "runs": True,
            "step_seconds": round(private_seconds, 3),
            "plain_step_seconds_alongside": round(plain_seconds, 3),
            "ratio_to_plain": round(private_seconds / plain_seconds, 3),
            "ratio_per_pair": [round(dp / base, 3) for base, dp in pairs],
            "clips_per_second": round(BATCH / private_seconds, 3),
            "peak_memory_mib": peak,
        }
    )


def run_fresh(mode: str, steps: int, warmup: int) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(mode, steps, warmup, queue))
    process.start()
    result = queue.get()
    process.join()
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dp_step_cpu.json")
    args = parser.parse_args()
    before = machine_load()
    plain = run_fresh(PLAIN, args.steps, args.warmup)
    results = [plain] + [run_fresh(mode, args.steps, args.warmup) for mode in args.modes.split(",")]
    report = {
        "preset": "lite",
        "batch": BATCH,
        "frames": FRAMES,
        "image_size": SIZE,
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "niceness": os.nice(0),
        "steps": args.steps,
        "warmup": args.warmup,
        "machine_before": before,
        "machine_after": machine_load(),
        "target_ratio": 2.0,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
