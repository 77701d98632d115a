"""Shared pieces of the main job, the experiments and the benchmarks: trained tasks, timing, machine facts.

Every result file names the machine that produced it (:func:`machine`), and every
timing blocks on its results (:func:`timed`), so figures from different scripts
are read the same way.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import numpy as np
import optax

from ..core.checkpoint import atomic_write
from ..core.task import Task
from . import data as cdata
from . import models as cmodels
from . import training
from .training import TRAINING


def timed(fn, *, repeats: int = 1, warmup: bool = True):
    """``(seconds, result)``: the median wall-clock seconds of ``fn()`` (results blocked on).

    With ``warmup`` one untimed call comes first (it compiles); without it the
    first call is timed, compilation included.
    """
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
    """What produced the figures: device, CPU, memory, versions and the load averages now."""
    from .. import __version__

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
        "devices": [str(d) for d in devices],
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        # A run pinned with `taskset` uses fewer cores than the machine has.
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "cif_jax": __version__,
        # Other work on the machine skews seconds (ratios less so): the 1/5/15-minute load averages.
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def write_json(path: str, obj) -> None:
    """Writes ``obj`` as JSON atomically: a reader sees the old file or the new one, never half of one."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def trained_task(dataset: str, model: str, *, workdir: str, seed: int = 0, subsample_n: int | None = None):
    """A trained model's ``Task`` on ``dataset``, its checkpoint cached in ``workdir``.

    Training follows the main job's protocol (:data:`cif_jax.workloads.training.TRAINING`).
    Returns ``(task, dataset)``; ``subsample_n`` keeps the first n training examples
    of a fixed permutation (for N sweeps; the model is the one trained on all).
    """
    os.makedirs(workdir, exist_ok=True)
    ds = cdata.load_dataset(dataset, seed=seed)
    config = cmodels.model_config(model, in_shape=ds.x_train.shape[1:], num_classes=ds.num_classes)
    epochs, lr, schedule = TRAINING[dataset]
    ckpt = os.path.join(workdir, f"{dataset}-{model}-seed{seed}-e{epochs}.ckpt")
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
    task = Task.from_nnx(net, optax.softmax_cross_entropy_with_integer_labels, x, y)
    return task, ds
