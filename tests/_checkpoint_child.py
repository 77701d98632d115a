"""A cache build with ``checkpoint_dir`` that is killed with SIGKILL partway through its solves.

Run by ``tests/test_checkpoint.py`` in its own process: ``python _checkpoint_child.py DIR KILL_AFTER``.
The process sends itself SIGKILL right after the ``KILL_AFTER``-th block of solved
responses reaches the directory, so the kill lands at a known point in the middle of
the solves (a real SIGKILL: no handler, no cleanup, no flush) and the test does not
depend on timing.
"""

import os
import signal
import sys

from _checkpoint_setup import build

from cif_jax.core import checkpoint

if __name__ == "__main__":
    directory, kill_after = sys.argv[1], int(sys.argv[2])
    save = checkpoint.Checkpoint.save
    blocks = []

    def save_then_maybe_die(self, name, arrays):
        save(self, name, arrays)
        if name.startswith("solves"):
            blocks.append(name)
            if len(blocks) == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.Checkpoint.save = save_then_maybe_die
    build(directory)
    print("finished without being killed")
