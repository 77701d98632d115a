"""The examples run, small, and say what they claim: CiF agrees with IF where checked; a saved cache answers alike."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


class _Ran:
    """``main`` of an example, run in its own process (its compilations stay out of the suite's process)."""

    def __init__(self, name):
        self.name = name

    def main(self, **kwargs):
        code = (
            "import importlib.util, json, sys, numpy as np\n"
            f"spec = importlib.util.spec_from_file_location('ex', {str(EXAMPLES / (self.name + '.py'))!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            f"out = m.main(**{kwargs!r})\n"
            "print('RESULT ' + json.dumps([np.asarray(v).tolist() for v in out]))\n"
        )
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                             env=dict(os.environ, JAX_ENABLE_X64="True"))
        assert run.returncode == 0, run.stderr[-3000:]
        line = next(v for v in run.stdout.splitlines() if v.startswith("RESULT "))
        return tuple(np.asarray(v) for v in json.loads(line[len("RESULT "):]))


def _load(name):
    return _Ran(name)


def test_nnx_folds():
    scores, if_scores, ratio = _load("nnx_folds").main(num_train=400, epochs=60, num_folds=10, checked=3)
    assert scores.shape == (10,) and np.all(np.isfinite(scores))
    # The corrected estimator against exact IF on the folds it ranks first (float32, C = 10).
    np.testing.assert_allclose(ratio, 1.0, atol=0.35)


def test_equinox_regression():
    scores, if_scores, pearson = _load("equinox_regression").main(steps=150, num_groups=8)
    assert scores.shape == if_scores.shape == (8,) and np.all(np.isfinite(if_scores))
    assert pearson > 0.6  # 0.77 measured at these settings; 0.84 at the defaults (20 groups, 500 steps)


def test_save_and_query():
    here, there = _load("save_and_query").main()
    # The other process reads the same responses: its answers agree to float32 rounding of its own training.
    np.testing.assert_allclose(there, here, rtol=1e-4, atol=1e-7)


def test_linen_mislabels():
    found, flipped = _load("linen_mislabels").main(steps=600)
    assert found >= flipped // 2  # chance would find about 1.6 of 17


def test_multi_device_runs_on_two_forced_host_devices():
    """A subprocess: the device count is fixed when jax starts."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    run = subprocess.run([sys.executable, str(EXAMPLES / "multi_device.py")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "2 devices" in run.stdout
    gap = float(run.stdout.split("largest relative difference ")[1].split()[0])
    assert gap < 1e-3  # both solves meet rtol 1e-4; float32
