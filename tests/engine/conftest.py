import pytest

from bharnet.data.synthetic import make_synthetic


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """4 classes (2 hand-centric), 4 train / 2 test samples per class, 16 frames."""
    return make_synthetic(tmp_path_factory.mktemp("tiny"), num_classes=4, num_hand_centric=2,
                          samples_per_class_train=4, samples_per_class_test=2, frames=16)
