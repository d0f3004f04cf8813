import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from fewshot.tasks.data_root import DataError
from fewshot.tasks.episodes import EpisodeSampler
from fewshot.tasks.folder import DatasetCollection, ImageFolderCollection, split_classes, validate_splits


def _tree(root, classes=("zebra", "ant", "cat"), per_class=4, size=(20, 16)):
    """root/<class>/<i>.png, class c filled with grey level 50 * (c + 1) (c = sorted position)."""
    for c, name in enumerate(sorted(classes)):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, (50 * (c + 1),) * 3).save(folder / f"{i:03d}.png")
    return root


def test_image_folder_classes_labels_and_images(tmp_path):
    root = _tree(tmp_path / "data")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"")
    Image.new("L", (20, 16), 150).save(root / "cat" / "grey.JPG")  # upper-case extension, grey file
    data = ImageFolderCollection(root)
    assert data.class_names == ["ant", "cat", "zebra"] and data.classes == [0, 1, 2]
    assert data.labels.tolist() == [0] * 4 + [1] * 5 + [2] * 4
    assert data.paths[4].name == "000.png" and data.paths[8].name == "grey.JPG"
    x = data.load(torch.tensor([0, 8, 12]))
    assert x.shape == (3, 3, 16, 20) and x.dtype == torch.float32  # native size (H, W) = (16, 20)
    assert torch.allclose(x[:, 0, 0, 0], torch.tensor([50.0, 150.0, 150.0]) / 255, atol=0.02)


def test_image_folder_resize_and_grayscale(tmp_path):
    data = ImageFolderCollection(_tree(tmp_path / "data"), image_size=28, grayscale=True)
    x = data.load(torch.arange(len(data)))
    assert x.shape == (12, 1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0
    batch = EpisodeSampler(data, data.classes, n_way=3, k_shot=1, q_queries=2).sample(4, torch.Generator().manual_seed(1))
    assert batch.support_x.shape == (4, 3, 1, 28, 28) and batch.query_x.shape == (4, 6, 1, 28, 28)


def test_image_folder_mixed_sizes_need_image_size(tmp_path):
    root = _tree(tmp_path / "data")
    Image.new("RGB", (9, 9)).save(root / "ant" / "small.png")
    with pytest.raises(ValueError, match="pass image_size"):
        ImageFolderCollection(root).load(torch.arange(5))
    assert ImageFolderCollection(root, image_size=12).load(torch.arange(5)).shape == (5, 3, 12, 12)


def test_image_folder_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderCollection(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty has no class sub-folders"):
        ImageFolderCollection(tmp_path / "empty")
    root = _tree(tmp_path / "data")
    (root / "dog").mkdir()
    (root / "dog" / "readme.txt").write_text("no images yet")
    with pytest.raises(ValueError, match=r"class folder .*dog holds no images"):
        ImageFolderCollection(root)
    with pytest.raises(ValueError, match="image_size"):
        ImageFolderCollection(tmp_path / "data", image_size=0)


def test_image_folder_corrupt_file_is_a_data_error_on_load(tmp_path):
    root = _tree(tmp_path / "data")
    (root / "ant" / "000.png").write_bytes(b"not a png")
    data = ImageFolderCollection(root)  # lazy: nothing decoded yet
    with pytest.raises(DataError, match="000.png"):
        data.load(torch.tensor([0]))


def test_dataset_collection_over_a_tensor_dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (30, 1, 5, 5), generator=g, dtype=torch.uint8)
    y = torch.arange(30) % 6
    data = DatasetCollection(TensorDataset(x, y))
    assert torch.equal(data.labels, y) and data.labels.dtype == torch.int64 and data.classes == list(range(6))
    loaded = data.load(torch.tensor([3, 0]))
    assert loaded.dtype == torch.float32 and torch.equal(loaded, x[[3, 0]].float())
    batch = EpisodeSampler(data, [0, 2, 4], n_way=2, k_shot=2, q_queries=3).sample(3, g)
    assert batch.support_x.shape == (3, 4, 1, 5, 5) and batch.query_y.shape == (3, 6)


class _Items(Dataset):
    """Items (array, label) from lists; ``targets`` only when given."""

    def __init__(self, labels, targets=None):
        self.labels = labels
        if targets is not None:
            self.targets = targets

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return np.full((2,), i, dtype=np.float64), self.labels[i]


def test_dataset_collection_labels_from_targets_or_items():
    assert DatasetCollection(_Items([1, np.int64(0), torch.tensor(2)])).labels.tolist() == [1, 0, 2]
    # targets wins, items are not read for labels
    assert DatasetCollection(_Items([None] * 3, targets=[2, 2, 0])).labels.tolist() == [2, 2, 0]
    assert DatasetCollection(_Items([None] * 3, targets=torch.tensor([1, 0, 1]))).labels.tolist() == [1, 0, 1]
    assert DatasetCollection(_Items([0, 1])).load([1]).tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize(
    "labels, targets, message",
    [
        ([0, 1.5, 2], None, "item 1: label 1.5 is not an integer"),
        ([0, "cat"], None, "item 1: label 'cat'"),
        ([0, 1, torch.tensor(0.0)], None, "item 2: label"),
        ([0, True], None, "item 1: label True"),
        ([0, -1], None, "item 1: label -1 is negative"),
        ([0, 0, 0], [0, 1.0, 2], "item 1: label 1.0"),
        ([0, 0, 0], torch.tensor([0.0, 1.0, 2.0]), "item 0: label"),
        ([0, 0, 0], torch.tensor([0, 3, -2]), "item 2: label -2 is negative"),
        ([0, 0, 0], [0, 1], "targets has 2 labels but the dataset has 3"),
    ],
)
def test_dataset_collection_rejects_bad_labels(labels, targets, message):
    with pytest.raises(ValueError, match=message):
        DatasetCollection(_Items(labels, targets))


def test_split_classes_is_disjoint_complete_and_seeded():
    splits = split_classes(100, seed=3)
    assert {k: len(v) for k, v in splits.items()} == {"train": 64, "val": 16, "test": 20}
    assert sorted(sum(splits.values(), [])) == list(range(100))
    assert split_classes(100, seed=3) == splits
    assert split_classes(100, seed=4) != splits
    assert all(v == sorted(v) for v in splits.values())


def test_split_classes_fractions_counts_and_class_lists():
    by_fraction = split_classes(7, fractions=(0.5, 0.25, 0.25), seed=0)
    assert [len(v) for v in by_fraction.values()] == [3, 2, 2]  # 3.5, 1.75, 1.75: the two largest remainders round up
    ids = [10, 20, 30, 40, 50, 60]
    by_count = split_classes(ids, counts=(3, 1, 1), seed=0)
    assert [len(v) for v in by_count.values()] == [3, 1, 1]
    used = sum(by_count.values(), [])
    assert len(set(used)) == 5 and set(used) <= set(ids)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(classes=10, fractions=(0.5, 0.5)), "three numbers"),
        (dict(classes=10, fractions=(0.5, 0.4, 0.2)), "sum to 1"),
        (dict(classes=10, fractions=(1.2, -0.1, -0.1)), ">= 0"),
        (dict(classes=10, counts=(6, 3, 2)), "only 10"),
        (dict(classes=10, counts=(6, -1, 2)), "integers >= 0"),
        (dict(classes=10, counts=(5, 2, 2), fractions=(0.5, 0.3, 0.2)), "not both"),
        (dict(classes=[1, 2, 2, 3]), "twice"),
        (dict(classes=[1, 2.5, 3]), "class list entry 1"),
        (dict(classes=-3), ">= 0"),
    ],
)
def test_split_classes_bad_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_classes(**kwargs)


def test_user_splits_are_validated():
    mine = {"train": [0, 1, 2], "val": [3], "test": [np.int64(4), torch.tensor(5)]}
    assert validate_splits(mine) == {"train": [0, 1, 2], "val": [3], "test": [4, 5]}
    names = ["ant", "cat", "dog", "zebra"]
    assert validate_splits({"train": ["ant", "dog"], "test": [1, "zebra"]}, class_names=names) == {
        "train": [0, 2],
        "test": [1, 3],
    }
    with pytest.raises(ValueError, match="class 2 is in splits 'train' and 'test'"):
        validate_splits({"train": [0, 1, 2], "val": [3], "test": [2, 4]})
    with pytest.raises(ValueError, match="splits overlap: class 0"):
        validate_splits({"train": ["ant"], "val": [0]}, class_names=names)


@pytest.mark.parametrize(
    "splits, message",
    [
        ({"train": [0], "meta-test": [1]}, "unknown split name.*allowed: train, val, test"),
        ({"train": [0, "cat"]}, "unknown class 'cat'"),
        ({"train": [0, 1.0]}, "1.0 is not a class id"),
        ({"train": [True]}, "True is not a class id"),
        ({"train": [-1]}, "class id -1 is out of range"),
        ({"train": [0, 1, 1]}, "twice in split 'train'"),
    ],
)
def test_user_splits_bad_inputs(splits, message):
    with pytest.raises(ValueError, match=message):
        validate_splits(splits)


def test_user_split_ids_must_be_known_classes():
    with pytest.raises(ValueError, match=r"class id 4 is out of range; allowed: 0\.\.3"):
        validate_splits({"train": [0, 4]}, class_names=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="unknown class 'e'"):
        validate_splits({"train": ["e"]}, class_names=["a", "b", "c", "d"])
