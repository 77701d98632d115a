"""Saving and loading influence caches: versioned, checksummed, written atomically.

A cache file is an ``.npz`` archive with one array per field and a JSON header
(``__header__``) holding the format version, the static fields, and each array's
shape, dtype and SHA-256. It is written to a temporary file in the target folder,
flushed to disk and renamed over the target, so a reader never sees a partial
file. :func:`load_cache` refuses a file whose header, shapes, dtypes or checksums
do not match, and (given a task) a cache built from other params or data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import zipfile
import zlib

import jax.numpy as jnp
import numpy as np

from ..core.checkpoint import atomic_write
from ..core.task import Task
from .cache import InfluenceCache
from .correction import CorrectionTerms
from .lowrank import LowRankTerms

FORMAT = "cif_jax.InfluenceCache"
FORMAT_VERSION = 6
# 3: adds the static field "solver"; version 2 files are read as solver="cg".
# 4: adds the self-influence correction (arrays "correction.*", static "correction_method" and
#    "correction_rank"); version 2 and 3 files are read with no correction.
# 5: adds the low-rank factors and coordinates (arrays "lowrank.*", static "lowrank_note") and the
#    self terms' remainders ("correction.remainder"); version 2-4 files are read at rank 0, with a warning.

_ARRAYS = (
    "assignments", "cluster_sizes", "responses", "means", "residuals", "mean_norms", "num_steps",
    "cluster_scatter", "scatter_trace", "deviation_norms", "sketches", "centroids", "sketch_key",
)
_STATIC = (
    "num_examples", "damping", "sketch_dim", "sketch_block_size", "normalize_sketches", "rtol", "atol",
    "max_steps", "fingerprint", "curvature", "solver", "correction_method", "correction_rank", "lowrank_note",
)
_CORRECTION = ("values", "raw", "remainder", "grad_norms", "residuals", "sample", "sample_values", "sample_residuals",
               "scale", "scale_stderr", "ratio_std")
#: Correction arrays that version 4 lacked, and the version-4 array each is read as (rank 0: the remainder is t_i).
_CORRECTION_V4 = {"remainder": "values"}
_LOWRANK = ("basis", "eigenvalues", "coords", "mean_coords", "tail_norms", "error_estimate", "predicted_error")


class CacheFileError(ValueError):
    """A cache file that cannot be used: missing, corrupt, of another version, or for another task."""


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def save_cache(path: str | os.PathLike, cache: InfluenceCache) -> None:
    """Writes ``cache`` to ``path`` (``.npz``) atomically.

    Args:
        path: target file; its folder must exist. An existing file is replaced only
            once the new one is complete.
        cache: the :class:`InfluenceCache` to save.
    """
    if not isinstance(cache, InfluenceCache):
        raise TypeError(f"`save_cache(cache=...)` must be an InfluenceCache, got {type(cache).__name__}.")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CacheFileError(f"cannot save the cache to {path!r}: folder {folder!r} does not exist.")
    arrays = {name: np.asarray(getattr(cache, name)) for name in _ARRAYS}
    corr = cache.correction
    if corr is not None:
        arrays.update({f"correction.{name}": np.asarray(getattr(corr, name)) for name in _CORRECTION})
    low = cache.lowrank
    if low is not None:
        arrays.update({f"lowrank.{name}": np.asarray(getattr(low, name)) for name in _LOWRANK})
    static = {name: getattr(cache, name) for name in _STATIC if not name.startswith(("correction_", "lowrank_"))}
    static["correction_method"] = None if corr is None else corr.method
    static["correction_rank"] = None if corr is None else corr.rank
    static["lowrank_note"] = None if low is None else low.note
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "static": static,
        "static_sha256": _static_digest(static),
        "timings": [list(t) for t in cache.timings],
        "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype), "sha256": _digest(v)} for k, v in arrays.items()},
    }
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays))
    except OSError as err:
        raise CacheFileError(f"cannot save the cache to {path!r}: {err.strerror or err}. Pass a path in a writable "
                             "folder with room for it.") from err


def load_cache(path: str | os.PathLike, *, task: Task | None = None) -> InfluenceCache:
    """Reads a cache written by :func:`save_cache`, checking it thoroughly.

    Args:
        path: the cache file.
        task: optional; if given, the cache must have been built from exactly this
            task's params and data (fingerprint), else :class:`CacheFileError`.

    Raises:
        CacheFileError: missing, truncated or corrupt file; another format version;
            inconsistent shapes or dtypes; a checksum or fingerprint mismatch.
    """
    path = os.fspath(path)
    header, arrays = _read_file(path)
    header, old = _upgrade(path, header)
    static = header["static"]
    method, note = static["correction_method"], static["lowrank_note"]
    _check_manifest(path, header, arrays, old)
    _check_static(path, static)
    want = header.get("static_sha256", "absent")
    if want is not None and want != _static_digest(static):
        raise CacheFileError(f"{path!r}: the header's static fields (damping, tolerances, fingerprint, ...) fail "
                             "their SHA-256 checksum: the file was changed after it was written. Rebuild the cache.")
    n = static["num_examples"]
    c, p = arrays["responses"].shape
    expected = {
        "assignments": (n,), "cluster_sizes": (c,), "means": (c, p), "residuals": (c,), "mean_norms": (c,),
        "num_steps": (c,), "cluster_scatter": (c,), "deviation_norms": (n,), "scatter_trace": (),
    }
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise CacheFileError(f"{path!r}: array {name!r} has shape {arrays[name].shape}, expected {shape}.")
    if arrays["means"].dtype != arrays["responses"].dtype:
        raise CacheFileError(f"{path!r}: means and responses have different dtypes.")
    stored = arrays["responses"].dtype
    read_as = jnp.asarray(np.zeros((), stored)).dtype  # what jnp.asarray below will make of it
    if read_as != stored:
        warnings.warn(f"{path!r} holds a {stored} cache, but JAX is running without 64-bit types, so it is read "
                      f"as {read_as}. Enable them before loading "
                      "(jax.config.update('jax_enable_x64', True)) to keep its precision.", stacklevel=2)
    correction = None if method is None else _read_correction(path, arrays, static, n, old)
    lowrank = None if note is None else _read_lowrank(path, arrays, note, n, c, p)
    static = {k: v for k, v in static.items() if not k.startswith(("correction_", "lowrank_"))}
    try:
        cache = InfluenceCache(
            **{name: jnp.asarray(arrays[name]) for name in _ARRAYS},
            **static,
            timings=tuple((str(k), float(v)) for k, v in header.get("timings", [])),
            correction=correction,
            lowrank=lowrank,
        )
    except (TypeError, ValueError) as err:
        raise CacheFileError(f"{path!r}: the header's fields are malformed: {err}") from err
    if task is not None:
        from ..core.task import fingerprint

        if task.num_examples != n or task.num_params != p or fingerprint(task) != cache.fingerprint:
            raise CacheFileError(
                f"{path!r} was built for another model snapshot or data set than this task (fingerprint "
                "mismatch); rebuild the cache for this task."
            )
    if old and method is not None:
        warnings.warn(
            f"{path!r} is a cache of format version 4: it holds no low-rank factors or per-example coordinates, so "
            "queries whose evaluation set is not the removed set (held-out points, other folds) are answered by "
            "the clusters alone (the paper's eq. 11), and the self terms are added whole. Rebuild it with this "
            "version for the default estimator.",
            stacklevel=2,
        )
    return cache


def _read_file(path: str) -> tuple[dict, dict]:
    """The header and the arrays of a cache file (any failure to read it is a :class:`CacheFileError`)."""
    if not os.path.isfile(path):
        raise CacheFileError(f"no cache file at {path!r}.")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "__header__" not in data.files:
                raise CacheFileError(f"{path!r} is not a cif_jax cache (no header).")
            header = json.loads(bytes(data["__header__"]).decode())
            arrays = {name: data[name] for name in data.files if name != "__header__"}
    except CacheFileError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, NotImplementedError, zlib.error) as err:
        raise CacheFileError(f"{path!r} is truncated or corrupt and cannot be read: {err}") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CacheFileError(f"{path!r} is not a cif_jax cache (format {header.get('format')!r}).")
    return header, arrays


def _upgrade(path: str, header: dict) -> tuple[dict, bool]:
    """The header of an older format version read as the current one, and whether it was version 4
    (no factors; its correction lacks the remainder)."""
    version = header.get("format_version")
    if version == 2 and isinstance(header.get("static"), dict) and "solver" not in header["static"]:
        header["static"]["solver"] = "cg"  # version 2 had CG only
        version = 3
    if version == 3 and isinstance(header.get("static"), dict):
        header["static"].update(correction_method=None, correction_rank=None)  # no correction before version 4
        version = 4
    old = version == 4
    if old and isinstance(header.get("static"), dict):
        header["static"]["lowrank_note"] = None  # no factors before version 5
        version = 5
    if version == 5:
        header["static_sha256"] = None  # no checksum of the static fields before version 6
        version = FORMAT_VERSION
    if version != FORMAT_VERSION:
        raise CacheFileError(
            f"{path!r} has cache format version {version}; this cif_jax reads version {FORMAT_VERSION}. "
            "Rebuild the cache with this version."
        )
    if not isinstance(header.get("arrays"), dict) or not isinstance(header.get("static"), dict):
        raise CacheFileError(f"{path!r} has an incomplete header (no array manifest or static fields).")
    if set(header["static"]) != set(_STATIC):
        raise CacheFileError(
            f"{path!r}: header static fields {sorted(header['static'])} differ from the expected {sorted(_STATIC)}."
        )
    return header, old


def _check_manifest(path: str, header: dict, arrays: dict, old: bool) -> None:
    """Every array the header names is there, as its manifest says (shape, dtype, SHA-256), and no other."""
    static = header["static"]
    stored_correction = [n for n in _CORRECTION if not (old and n in _CORRECTION_V4)]
    names = (list(_ARRAYS)
             + ([] if static["correction_method"] is None else [f"correction.{n}" for n in stored_correction])
             + ([] if static["lowrank_note"] is None else [f"lowrank.{n}" for n in _LOWRANK]))
    extra = sorted(set(arrays) - set(names))
    if extra:
        raise CacheFileError(f"{path!r} holds arrays its header does not account for: {extra[:5]}.")
    for name in names:
        if name not in arrays:
            raise CacheFileError(f"{path!r} lacks the array {name!r}: the file is incomplete.")
        spec = header["arrays"].get(name, {})
        arr = arrays[name]
        if list(arr.shape) != spec.get("shape") or str(arr.dtype) != spec.get("dtype"):
            raise CacheFileError(f"{path!r}: array {name!r} has shape {arr.shape}/{arr.dtype}, header says "
                                 f"{spec.get('shape')}/{spec.get('dtype')}.")
        if _digest(arr) != spec.get("sha256"):
            raise CacheFileError(f"{path!r}: array {name!r} fails its checksum; the file is corrupt.")


def _static_digest(static: dict) -> str:
    """SHA-256 of the header's static fields (as JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(static, sort_keys=True).encode()).hexdigest()


def _check_static(path: str, static: dict) -> None:
    """The header's static fields hold values a build could have written (types and ranges)."""
    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    def number(v, low, strict):
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (v > low if strict else v >= low))

    checks = {
        "num_examples": positive_int, "sketch_dim": positive_int, "sketch_block_size": positive_int,
        "max_steps": positive_int, "damping": lambda v: number(v, 0, True), "rtol": lambda v: number(v, 0, False),
        "atol": lambda v: number(v, 0, False), "normalize_sketches": lambda v: isinstance(v, bool),
        "fingerprint": lambda v: isinstance(v, str), "curvature": lambda v: isinstance(v, str),
        "solver": lambda v: isinstance(v, str),
    }
    bad = [f"{k}={static[k]!r}" for k, ok in checks.items() if not ok(static[k])]
    if bad:
        raise CacheFileError(f"{path!r}: the header's fields hold values no build writes ({', '.join(bad)}); the "
                             "file was altered. Rebuild the cache.")


def _read_correction(path: str, arrays: dict, static: dict, n: int, old: bool) -> CorrectionTerms:
    """The ``correction.*`` arrays as :class:`CorrectionTerms`, their shapes and dtypes checked."""
    method, rank = static["correction_method"], static["correction_rank"]
    if old:
        for name, source in _CORRECTION_V4.items():
            arrays[f"correction.{name}"] = arrays[f"correction.{source}"]
    m = arrays["correction.sample"].shape
    want = {name: (n,) for name in ("values", "raw", "remainder", "grad_norms", "residuals")}
    want.update(sample_values=m, sample_residuals=m, scale=(), scale_stderr=(), ratio_std=())
    if len(m) != 1:
        raise CacheFileError(f"{path!r}: array 'correction.sample' has shape {m}, expected (m,).")
    for name, shape in want.items():
        arr = arrays[f"correction.{name}"]
        if arr.shape != shape:
            raise CacheFileError(f"{path!r}: array 'correction.{name}' has shape {arr.shape}, expected {shape}.")
        if arr.dtype != arrays["responses"].dtype:
            raise CacheFileError(f"{path!r}: array 'correction.{name}' has dtype {arr.dtype}, the cache "
                                 f"{arrays['responses'].dtype}.")
    if not np.issubdtype(arrays["correction.sample"].dtype, np.integer):
        raise CacheFileError(f"{path!r}: array 'correction.sample' must hold integers.")
    if not isinstance(method, str) or isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise CacheFileError(f"{path!r}: the header's correction fields are malformed ({method!r}, {rank!r}).")
    return CorrectionTerms(**{name: jnp.asarray(arrays[f"correction.{name}"]) for name in _CORRECTION},
                           method=method, rank=rank)


def _read_lowrank(path, arrays, note, n, c, p) -> LowRankTerms:
    """The ``lowrank.*`` arrays as a :class:`LowRankTerms`, their shapes and dtypes checked."""
    basis = arrays["lowrank.basis"]
    if basis.ndim != 2 or basis.shape[1] != p:
        raise CacheFileError(f"{path!r}: array 'lowrank.basis' has shape {basis.shape}, expected (r, {p}).")
    r = basis.shape[0]
    want = {"eigenvalues": (r,), "coords": (n, r), "mean_coords": (c, r), "tail_norms": (n,), "error_estimate": (),
            "predicted_error": ()}
    for name, shape in want.items():
        arr = arrays[f"lowrank.{name}"]
        if arr.shape != shape:
            raise CacheFileError(f"{path!r}: array 'lowrank.{name}' has shape {arr.shape}, expected {shape}.")
    for name in _LOWRANK:
        if arrays[f"lowrank.{name}"].dtype != arrays["responses"].dtype:
            raise CacheFileError(f"{path!r}: array 'lowrank.{name}' has dtype {arrays[f'lowrank.{name}'].dtype}, the "
                                 f"cache {arrays['responses'].dtype}.")
    if not isinstance(note, str):
        raise CacheFileError(f"{path!r}: the header's field 'lowrank_note' is malformed ({note!r}).")
    return LowRankTerms(**{name: jnp.asarray(arrays[f"lowrank.{name}"]) for name in _LOWRANK}, note=note)
