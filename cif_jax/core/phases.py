"""One runner for the phases of a long computation: timing, progress and checkpointing.

A build (the CiF cache, the IF solves) is a sequence of named phases. Each goes through
:class:`PhaseRunner`, which times it (after ``jax.block_until_ready``), advances the
progress bar, and, when a :class:`cif_jax.core.checkpoint.Checkpoint` is given, saves
its arrays as it ends and reads them back on a resumed run. The phases themselves stay
plain functions of arrays.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from .checkpoint import Checkpoint


class PhaseRunner:
    """Runs named phases: each is timed, counted on the progress bar and, with a checkpoint, stored.

    Args:
        checkpoint: a :class:`Checkpoint` that keeps each stored phase (None: keep nothing).
        progress: show a progress bar of ``total`` phases.
        total: the number of phases the bar counts.
        desc: the bar's label.
    """

    def __init__(self, checkpoint: Checkpoint | None = None, *, progress: bool = False, total: int = 0,
                 desc: str = "phases"):
        self.checkpoint = checkpoint
        self.timings: list[tuple[str, float]] = []
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="phase")

    def __call__(self, name: str, compute, *, store: str | None = None, module=None):
        """``compute()``, timed as phase ``name``.

        With ``store`` (and a checkpoint), its value is saved under that name when it ends and
        read back instead of computed on a resumed run: a tuple of arrays (None entries kept),
        or, with ``module`` (an equinox Module class), a module of that class.
        """
        if self._bar is not None:
            self._bar.set_postfix_str(name)
        start = time.perf_counter()
        out = jax.block_until_ready(self.stored(store, compute, module=module))
        self.timings.append((name, time.perf_counter() - start))
        if self._bar is not None:
            self._bar.update(1)
        return out

    def stored(self, store: str | None, compute, *, module=None):
        """``compute()``, or its saved value (see :meth:`__call__`), without timing it as a phase."""
        if self.checkpoint is None or store is None:
            return compute()
        if module is not None:
            return self.checkpoint.module(store, module, compute)
        return tuple(None if a is None else jnp.asarray(a) for a in self.checkpoint.arrays_tuple(store, compute))

    def close(self) -> tuple[tuple[str, float], ...]:
        """The ``(phase, seconds)`` pairs, with ``("total", sum)`` last; closes the bar."""
        if self._bar is not None:
            self._bar.close()
        return tuple(self.timings) + (("total", sum(t for _, t in self.timings)),)
