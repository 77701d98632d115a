"""Shared pieces of the benchmark scripts: trained tasks, timing, machine facts."""

from __future__ import annotations

import os
import platform
import time

import jax
import numpy as np
import optax

import cif_jax as cj
from cif_jax import data as cdata
from cif_jax import models as cmodels
from cif_jax import training
from cif_jax.cli import TRAINING

WORKDIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_work")


def trained_task(dataset: str, model: str, *, seed: int = 0, subsample_n: int | None = None):
    """A trained model's Task on ``dataset`` (checkpoint cached under benchmarks/_work).

    Training follows the main job's protocol (``cif_jax.cli.TRAINING``).
    Returns ``(task, dataset)``; ``subsample_n`` keeps the first n training examples
    of a fixed permutation (for N sweeps; the model is the one trained on all).
    """
    os.makedirs(WORKDIR, exist_ok=True)
    ds = cdata.load_dataset(dataset, seed=seed)
    config = cmodels.model_config(model, in_shape=ds.x_train.shape[1:], num_classes=ds.num_classes)
    epochs, lr, schedule = TRAINING[dataset]
    ckpt = os.path.join(WORKDIR, f"{dataset}-{model}-seed{seed}-e{epochs}.ckpt")
    if os.path.exists(ckpt):
        net = training.load_checkpoint(ckpt, config=config)
    else:
        net = cmodels.build_from_config(config, seed=seed)
        net, _ = training.train(net, ds.x_train, ds.y_train, epochs=epochs, learning_rate=lr, schedule=schedule,
                                seed=seed, progress=True)
        training.save_checkpoint(ckpt, net, config=config, metadata={"epochs": epochs, "seed": seed})
    x, y = ds.x_train, ds.y_train
    if subsample_n is not None:
        keep = np.random.default_rng(seed).permutation(x.shape[0])[:subsample_n]
        x, y = x[keep], y[keep]
    task = cj.Task.from_nnx(net, optax.softmax_cross_entropy_with_integer_labels, x, y)
    return task, ds


def timed(fn, *, repeats: int = 1, warmup: bool = True):
    """Median wall-clock seconds of ``fn()`` (results blocked on), after one untimed call."""
    out = None
    if warmup:
        out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def machine() -> dict:
    """What produced the figures."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    devices = jax.devices()
    return {
        "platform": devices[0].platform,
        "device": str(devices[0].device_kind),
        "num_devices": len(devices),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "cif_jax": cj.__version__,
        # Other work on the machine skews seconds (ratios less so): the 1/5/15-minute load averages at the end.
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
