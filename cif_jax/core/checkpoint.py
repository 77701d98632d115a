"""Resumable long computations: each finished phase is written to a directory, atomically.

A :class:`Checkpoint` is a directory with a manifest (what is being computed, and
with which settings) and one ``.npz`` file per finished phase or block of solves.
A second run with the same manifest reads what is there and computes the rest; a
directory written for another task or other settings is refused. Every file is
written to a temporary name, flushed to disk and then renamed, so a run killed at
any moment leaves only whole files, and each array's SHA-256 is checked on load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "cif_jax.checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be resumed: other settings, another task, or damaged files."""


def _digest(arr: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def digest(*arrays) -> str:
    """A short SHA-256 of several arrays (PRNG keys by their data): names blocks by their inputs."""
    h = hashlib.sha256()
    for a in arrays:
        if hasattr(a, "dtype") and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        h.update(_digest(np.asarray(a)).encode())
    return h.hexdigest()[:16]


def leaves_digest(tree) -> str:
    """:func:`digest` of a pytree's array leaves (a solver's preconditioner arrays, a LiSSA key)."""
    return digest(*[leaf for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "dtype")])


#: The suffix of the temporary files :func:`atomic_write` renames into place.
TMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write, *, exclusive: bool = False) -> bool:
    """Writes a file so that readers see the old file or the new one, never a part of one.

    ``write(f)`` fills a temporary file (a hidden ``.NAME.*.tmp`` in the same folder),
    which is flushed to disk and then renamed to ``path``. ``exclusive``: create
    ``path`` only if it does not exist (by a hard link, atomic too) and return False,
    writing nothing, if it does. The temporary file never outlives the call.
    """
    path = os.fspath(path)
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=f".{name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _differences(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(wanted)):
        a, b = saved.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} in the directory, {b!r} now")
    return out


class Checkpoint:
    """A directory that holds the finished phases of one computation.

    Args:
        directory: created if missing. It must be empty or hold a checkpoint of the
            same ``kind`` and ``settings``.
        kind: what is computed (``"cache"``, ``"influence"``).
        settings: a JSON-serialisable dict of everything that determines the result
            (the task's fingerprint among them). Any difference refuses the directory.

    Raises:
        CheckpointError: the directory holds another computation, other settings,
            files that are not a checkpoint's, or a damaged file (on load).
    """

    def __init__(self, directory: str | os.PathLike, *, kind: str, settings: dict):
        self.directory = os.fspath(directory)
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind,
                    "settings": json.loads(json.dumps(settings))}
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"`checkpoint_dir` {self.directory!r} is a file, not a directory.")
        path = os.path.join(self.directory, MANIFEST)
        try:
            os.makedirs(self.directory, exist_ok=True)
            while not self._claim(path, manifest):
                pass  # another run created the manifest meanwhile: compare with it
        except OSError as err:
            raise CheckpointError(f"`checkpoint_dir` {self.directory!r} cannot be written: {err.strerror or err}. "
                                  "Pass a writable directory.") from err
        self.loaded: list[str] = []  # phases read back rather than computed, in order

    def _claim(self, path: str, manifest: dict) -> bool:
        """Checks the directory's manifest against ``manifest``, or writes it; False: lost a race, try again."""
        if os.path.exists(path):
            try:
                with open(path) as f:
                    saved = json.load(f)
            except (OSError, ValueError) as err:
                raise CheckpointError(f"{path} cannot be read as a checkpoint manifest: {err}") from err
            if saved.get("format") != FORMAT or saved.get("version") != FORMAT_VERSION:
                raise CheckpointError(f"{path} is not a cif_jax checkpoint of format version {FORMAT_VERSION} "
                                      f"(format {saved.get('format')!r}, version {saved.get('version')!r}).")
            diff = _differences(saved, manifest)
            if diff:
                raise CheckpointError(
                    f"`checkpoint_dir` {self.directory!r} holds a checkpoint of another computation; it differs in: "
                    + "; ".join(diff[:6]) + ". Use another directory, or delete this one to start afresh.")
            return True
        stray = [name for name in os.listdir(self.directory) if not name.endswith(TMP_SUFFIX)]
        if stray:
            raise CheckpointError(f"`checkpoint_dir` {self.directory!r} is not empty and holds no checkpoint "
                                  f"manifest (e.g. {sorted(stray)[:3]}); give an empty or new directory.")
        # Created exclusively, so two runs started at once with other settings cannot both claim the
        # directory: the loser re-reads and compares.
        return atomic_write(path, lambda f: f.write(json.dumps(manifest, indent=1).encode()), exclusive=True)

    def _path(self, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad checkpoint phase name {name!r}")
        return os.path.join(self.directory, f"{name}.npz")

    def __contains__(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def load(self, name: str) -> dict[str, np.ndarray]:
        path = self._path(name)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["__meta__"]))
                arrays = {k: z[k] for k in meta["digests"]}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise CheckpointError(f"{path} cannot be read: {err}. Delete it to recompute that phase.") from err
        for k, arr in arrays.items():
            if _digest(arr) != meta["digests"][k]:
                raise CheckpointError(f"{path}: array {k!r} does not match its SHA-256; the file is damaged. "
                                      "Delete it to recompute that phase.")
        self.loaded.append(name)
        return arrays

    def save(self, name: str, arrays: dict) -> None:
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        meta = json.dumps({"digests": {k: _digest(v) for k, v in arrays.items()}})
        atomic_write(self._path(name), lambda f: np.savez(f, __meta__=np.asarray(meta), **arrays))

    def arrays(self, name: str, compute) -> dict[str, np.ndarray]:
        """The arrays of phase ``name``: read back if finished, else ``compute()`` (a dict) and saved."""
        if name in self:
            return self.load(name)
        out = {k: np.asarray(v) for k, v in compute().items()}
        self.save(name, out)
        return out

    def arrays_tuple(self, name: str, compute) -> tuple:
        """As :meth:`arrays` for a phase that returns a tuple of arrays (or None entries)."""

        def as_dict():
            out = {}
            for i, v in enumerate(compute()):
                out[f"none{i:02d}" if v is None else f"a{i:02d}"] = np.zeros(()) if v is None else v
            return out

        saved = self.arrays(name, as_dict)
        count = len(saved)
        return tuple(None if f"none{i:02d}" in saved else saved[f"a{i:02d}"] for i in range(count))

    def module(self, name: str, cls, compute):
        """As :meth:`arrays` for a phase whose value is an equinox Module of class ``cls``."""
        return module_from_arrays(cls, self.arrays(name, lambda: module_arrays(compute())))


def module_arrays(module) -> dict:
    """An equinox Module's fields as a flat dict for :meth:`Checkpoint.save`: arrays as they are,
    every other field (strings, numbers) in one JSON entry."""
    arrays, statics = {}, {}
    for field in dataclasses.fields(module):
        value = getattr(module, field.name)
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            arrays[f"field_{field.name}"] = np.asarray(value)
        else:
            statics[field.name] = value
    arrays["__statics__"] = np.asarray(json.dumps(statics))
    return arrays


def module_from_arrays(cls, arrays: dict):
    """The inverse of :func:`module_arrays` for a Module of class ``cls``."""
    kwargs = json.loads(str(arrays["__statics__"]))
    for k, v in arrays.items():
        if k.startswith("field_"):
            kwargs[k[len("field_"):]] = jnp.asarray(v)
    return cls(**kwargs)
