"""Fixtures for the data tests."""
import pytest

from ntu_samples import skeleton_text


@pytest.fixture
def write_skeleton(tmp_path):
    """``write_skeleton(name, frames, folder=None, **format)`` writes a .skeleton file."""
    def write(name, frames, folder=None, **fmt):
        folder = tmp_path if folder is None else folder
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.skeleton"
        path.write_bytes(skeleton_text(frames, **fmt).encode("ascii"))
        return path
    return write


@pytest.fixture(scope="session")
def synthetic_default(tmp_path_factory):
    """The default synthetic dataset (the one `bharnet train` uses) and its generation time."""
    import time

    from bharnet.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synthetic_default")
    start = time.perf_counter()
    make_synthetic(root)
    return root, time.perf_counter() - start


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    """A small synthetic dataset: 4 classes (2 hand-centric), 3 + 2 samples each, 24 frames."""
    from bharnet.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synthetic_small"), num_classes=4,
                          num_hand_centric=2, samples_per_class_train=3,
                          samples_per_class_test=2, frames=24, seed=3)
