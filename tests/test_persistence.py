"""Saving and loading caches: round trip, task check, corruption, versioning, atomic writes."""

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import N, cache_for, softmax_problem

import cif_jax as cj
from cif_jax.cif import persistence


@pytest.fixture(scope="module")
def problem():
    return softmax_problem()


@pytest.fixture(scope="module")
def cache():
    return cache_for("softmax", correction="calibrated")  # every field, the correction included


@pytest.fixture
def saved(tmp_path, cache):
    path = tmp_path / "cache.npz"
    cj.save_cache(path, cache)
    return path


def _assert_same_cache(got, want):
    for field in dataclasses.fields(want):
        a, b = getattr(got, field.name), getattr(want, field.name)
        if isinstance(b, jax.Array):
            assert a.dtype == b.dtype and a.shape == b.shape, field.name
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field.name)
        elif isinstance(b, (cj.CorrectionTerms, cj.LowRankTerms)):
            _assert_same_cache(a, b)
        else:
            assert a == b, field.name


def _rewrite(path, edit):
    """Rewrites the npz at ``path`` member by member, ``edit(name, bytes) -> bytes`` (CRCs recomputed)."""
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, edit(name, data))


def _npy_bytes(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_round_trip_keeps_every_field(saved, cache):
    loaded = cj.load_cache(saved)
    _assert_same_cache(loaded, cache)
    assert loaded.timing == cache.timing and loaded.timing["total"] > 0
    assert os.listdir(saved.parent) == ["cache.npz"]  # no temporary files left behind


def test_loaded_cache_answers_queries(saved, cache):
    loaded = cj.load_cache(saved)
    subsets = [np.arange(5), np.arange(10, 40)]
    np.testing.assert_array_equal(np.asarray(cj.param_delta(loaded, subsets)),
                                  np.asarray(cj.param_delta(cache, subsets)))


def test_load_checks_the_task(saved, problem):
    task = problem.task
    _assert_same_cache(cj.load_cache(saved, task=task), cj.load_cache(saved))

    nudged = jax.tree_util.tree_map(lambda a: a.at[0].add(1e-12), task.params)
    other_params = cj.Task(task.apply_fn, task.loss_fn, nudged, task.inputs, task.targets)
    with pytest.raises(cj.CacheFileError, match="another model snapshot or data set"):
        cj.load_cache(saved, task=other_params)

    other_data = cj.Task(task.apply_fn, task.loss_fn, task.params, task.inputs.at[3, 1].add(1e-12), task.targets)
    with pytest.raises(cj.CacheFileError, match="another model snapshot or data set"):
        cj.load_cache(saved, task=other_data)

    other_labels = cj.Task(task.apply_fn, task.loss_fn, task.params, task.inputs,
                           (task.targets + 1) % 3)
    with pytest.raises(cj.CacheFileError, match="another model snapshot or data set"):
        cj.load_cache(saved, task=other_labels)

    fewer = cj.Task(task.apply_fn, task.loss_fn, task.params, task.inputs[:-1], task.targets[:-1])
    with pytest.raises(cj.CacheFileError, match="another model snapshot or data set"):
        cj.load_cache(saved, task=fewer)


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.0])
def test_truncated_file_is_refused(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[: int(keep * len(data))])
    with pytest.raises(cj.CacheFileError, match="truncated or corrupt"):
        cj.load_cache(saved)


def test_flipped_byte_in_array_is_refused(saved):
    # Flip the last data byte of `responses` in place: the zip CRC no longer matches.
    with zipfile.ZipFile(saved) as zf:
        info = zf.getinfo("responses.npy")
    raw = bytearray(saved.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    data_end = info.header_offset + 30 + name_len + extra_len + info.compress_size
    raw[data_end - 1] ^= 0x01
    saved.write_bytes(bytes(raw))
    with pytest.raises(cj.CacheFileError, match="corrupt"):
        cj.load_cache(saved)


def test_a_float64_cache_read_without_x64_says_so(saved, cache):
    # In a process with JAX's 64-bit types off (the default), a float64 cache can only be read as
    # float32; that must be said, not done silently.
    assert cache.responses.dtype == jnp.float64
    code = ("import warnings, cif_jax as cj\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            f"    c = cj.load_cache({str(saved)!r})\n"
            "print(c.responses.dtype, any('64-bit' in str(w.message) for w in caught))\n")
    env = {**os.environ, "JAX_ENABLE_X64": "0", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.split() == ["float32", "True"], out.stderr[-2000:]


@pytest.mark.parametrize("method", [99, 12])
def test_unknown_compression_in_the_central_directory_is_refused(saved, method):
    # A flipped byte in a central-directory entry's compression method (offset 10 of the
    # record) made zipfile raise NotImplementedError (99: unknown; 12: bzip2 over deflate data
    # fails to decompress); both must arrive as CacheFileError, which callers catch to rebuild.
    raw = bytearray(saved.read_bytes())
    at = raw.index(b"PK\x01\x02")
    raw[at + 10 : at + 12] = method.to_bytes(2, "little")
    saved.write_bytes(bytes(raw))
    with pytest.raises(cj.CacheFileError, match="corrupt"):
        cj.load_cache(saved)


def test_tampered_array_with_valid_zip_fails_its_checksum(saved):
    # A changed array in a well-formed archive (CRC recomputed) is caught by the header's SHA-256.
    def edit(name, data):
        if name != "responses.npy":
            return data
        arr = np.load(io.BytesIO(data)).copy()
        arr[0, 0] = np.nextafter(arr[0, 0], np.inf)
        return _npy_bytes(arr)

    _rewrite(saved, edit)
    with pytest.raises(cj.CacheFileError, match="responses.*checksum"):
        cj.load_cache(saved)


def _edit_header(saved, change):
    def edit(name, data):
        if name != "__header__.npy":
            return data
        header = json.loads(bytes(np.load(io.BytesIO(data))).decode())
        change(header)
        return _npy_bytes(np.frombuffer(json.dumps(header).encode(), np.uint8))

    _rewrite(saved, edit)


def test_other_format_version_is_refused(saved):
    _edit_header(saved, lambda h: h.update(format_version=h["format_version"] + 1))
    with pytest.raises(cj.CacheFileError, match="format version"):
        cj.load_cache(saved)


def test_inconsistent_header_is_refused(saved):
    _edit_header(saved, lambda h: h["arrays"]["means"].update(shape=[1, 1]))
    with pytest.raises(cj.CacheFileError, match="means"):
        cj.load_cache(saved)


@pytest.mark.parametrize("drop", ["static", "arrays", "damping"])
def test_header_with_missing_entries_is_refused(saved, drop):
    _edit_header(saved, lambda h: h["static"].pop(drop) if drop == "damping" else h.pop(drop))
    with pytest.raises(cj.CacheFileError):
        cj.load_cache(saved)


@pytest.mark.parametrize("field, value", [("damping", "abc"), ("damping", -1), ("damping", 0), ("rtol", -1e-4),
                                          ("num_examples", 0), ("max_steps", 2.5), ("normalize_sketches", "no"),
                                          ("fingerprint", 7)])
def test_header_values_no_build_writes_are_refused(saved, field, value):
    _edit_header(saved, lambda h: h["static"].update({field: value}))
    with pytest.raises(cj.CacheFileError, match=field):
        cj.load_cache(saved)


@pytest.mark.parametrize("field, value", [("damping", 0.5), ("rtol", 0.3), ("max_steps", 5)])
def test_plausible_header_values_fail_the_checksum(saved, field, value):
    # Values a build could have written pass the value checks; the header's checksum refuses them
    # (a damping rewritten from 1e-2 to 0.5 made `error_bound` 50x smaller before format 6).
    _edit_header(saved, lambda h: h["static"].update({field: value}))
    with pytest.raises(cj.CacheFileError, match="checksum"):
        cj.load_cache(saved)
    _edit_header(saved, lambda h: h.pop("static_sha256"))
    with pytest.raises(cj.CacheFileError, match="checksum"):  # and dropping the checksum is no way round it
        cj.load_cache(saved)


def test_missing_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(cj.CacheFileError, match="no cache file"):
        cj.load_cache(tmp_path / "absent.npz")
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(cj.CacheFileError, match="not a cif_jax cache"):
        cj.load_cache(other)


def test_save_into_missing_folder_raises(tmp_path, cache):
    with pytest.raises(cj.CacheFileError, match="does not exist"):
        cj.save_cache(tmp_path / "missing" / "cache.npz", cache)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(TypeError, match="InfluenceCache"):
        cj.save_cache(tmp_path / "c.npz", {"responses": jnp.zeros(3)})


def test_unwritable_save_target_is_the_librarys_error(tmp_path, cache, monkeypatch):
    from cif_jax.cif import persistence

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(persistence, "atomic_write", refuse)
    with pytest.raises(cj.CacheFileError, match="cannot save the cache .*Permission denied"):
        cj.save_cache(tmp_path / "c.npz", cache)


def test_failed_save_leaves_old_file_intact(saved, cache, monkeypatch):
    before = saved.read_bytes()

    def broken_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(cj.CacheFileError, match="disk full"):
        cj.save_cache(saved, cache)
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == ["cache.npz"]
    _assert_same_cache(cj.load_cache(saved), cache)


def test_save_overwrites_atomically(saved, cache):
    cj.save_cache(saved, cache)  # replacing an existing file
    assert os.listdir(saved.parent) == ["cache.npz"]
    _assert_same_cache(cj.load_cache(saved), cache)


def _drop_correction(path, prefixes=("correction.", "lowrank.")):
    """The file as versions 2 and 3 wrote it: no correction (or low-rank) arrays."""
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist() if not name.startswith(prefixes)}
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


V5_CORRECTION = ("correction.remainder.npy",)


def _downgrade_to_4(h):
    h["format_version"] = 4
    del h["static"]["lowrank_note"]
    h["arrays"] = {k: v for k, v in h["arrays"].items()
                   if not k.startswith("lowrank.") and f"{k}.npy" not in V5_CORRECTION}


def _downgrade_to_3(h):
    _downgrade_to_4(h)
    h["format_version"] = 3
    for name in ("correction_method", "correction_rank"):
        del h["static"][name]
    h["arrays"] = {k: v for k, v in h["arrays"].items() if not k.startswith("correction.")}


def test_version_4_files_read_at_rank_0_with_a_warning(saved, cache, problem):
    # Version 4 had the whole self terms but no factors, coordinates or remainders.
    with zipfile.ZipFile(saved) as zf:
        members = {name: zf.read(name) for name in zf.namelist()
                   if not name.startswith("lowrank.") and name not in V5_CORRECTION}
    with zipfile.ZipFile(saved, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    _edit_header(saved, _downgrade_to_4)
    with pytest.warns(UserWarning, match="format version 4: it holds no low-rank factors"):
        loaded = cj.load_cache(saved)
    assert loaded.lowrank is None
    np.testing.assert_array_equal(np.asarray(loaded.correction.remainder), np.asarray(cache.correction.values))
    # At rank 0 the default estimator is the clusters plus the whole self terms.
    folds = [np.arange(0, 10), np.arange(10, 20)]
    g = np.asarray(problem.grads[20:30].mean(axis=0))
    np.testing.assert_array_equal(np.asarray(cj.loss_delta(loaded, folds, g)),
                                  np.asarray(cj.loss_delta(cache, folds, g, estimator="paper")))
    np.testing.assert_allclose(np.asarray(cj.fold_loss_delta(loaded, problem.task, folds)),
                               np.asarray(cj.fold_loss_delta(cache, problem.task, folds, estimator="corrected")),
                               rtol=1e-12)


def test_version_2_files_read_as_cg(saved):
    # Version 2 had no `solver` field: CG was the only solver.
    def downgrade(h):
        _downgrade_to_3(h)
        h["format_version"] = 2
        del h["static"]["solver"]

    _drop_correction(saved)
    _edit_header(saved, downgrade)
    loaded = cj.load_cache(saved)
    assert loaded.solver == "cg" and loaded.correction is None


def test_version_3_files_read_without_correction(saved, cache):
    _drop_correction(saved)
    _edit_header(saved, _downgrade_to_3)
    loaded = cj.load_cache(saved)
    assert loaded.correction is None
    np.testing.assert_array_equal(np.asarray(loaded.responses), np.asarray(cache.responses))
    with pytest.raises(ValueError, match="no self-influence correction"):
        cj.loss_delta(loaded, [np.arange(3)], np.ones(cache.num_params), eval_sets=[np.arange(3)])


def test_correction_arrays_are_checked(saved):
    # An array whose bytes do not match the manifest is caught by its checksum ...
    def bad_bytes(name, data):
        return _npy_bytes(np.zeros(3)) if name == "correction.values.npy" else data

    _rewrite(saved, bad_bytes)
    with pytest.raises(cj.CacheFileError, match="correction.values"):
        cj.load_cache(saved)


def test_correction_shapes_and_fields_are_checked(tmp_path, cache):
    # ... and a self-consistent file (manifest rewritten to match) with a wrong shape, dtype or
    # malformed header field is refused by the structural checks.
    def write_with(array_edit=None, header_edit=None):
        path = tmp_path / "c.npz"
        cj.save_cache(path, cache)
        replaced = {}

        def edit(name, data):
            key = name[: -len(".npy")]
            if array_edit is not None and key in array_edit:
                arr = array_edit[key]
                replaced[key] = arr
                return _npy_bytes(arr)
            return data

        _rewrite(path, edit)

        def fix(h):
            for key, arr in replaced.items():
                h["arrays"][key] = {"shape": list(arr.shape), "dtype": str(arr.dtype),
                                    "sha256": hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()}
            if header_edit is not None:
                header_edit(h)
                # Self-consistent: the static fields' checksum rewritten too, so that the
                # structural checks, not the checksum, must refuse it.
                h["static_sha256"] = persistence._static_digest(h["static"])

        _edit_header(path, fix)
        return path

    with pytest.raises(cj.CacheFileError, match=r"correction.values' has shape \(3,\), expected \(48,\)"):
        cj.load_cache(write_with({"correction.values": np.zeros(3)}))
    with pytest.raises(cj.CacheFileError, match="correction.raw' has dtype float32"):
        cj.load_cache(write_with({"correction.raw": np.zeros(N, np.float32)}))
    with pytest.raises(cj.CacheFileError, match="correction fields are malformed"):
        cj.load_cache(write_with(header_edit=lambda h: h["static"].update(correction_rank="256")))
