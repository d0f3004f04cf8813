import csv
import hashlib

import pytest
import torch
from PIL import Image

from fewshot.tasks.data_root import DataError
from fewshot.tasks.episodes import EpisodeSampler, check_disjoint
from fewshot.tasks.miniimagenet import (
    SHIPPED_CSV_DIR,
    SHIPPED_SHA256,
    load_miniimagenet,
    miniimagenet_splits,
    miniimagenet_wnids,
    read_split_csv,
)

# A miniature miniImageNet: 5 train, 2 val and 2 test classes of 30 images each.
# The WordNet ids are listed unsorted on purpose: class ids follow sorted order.
FAKE_WNIDS = {
    "train": ["n05000004", "n05000000", "n05000003", "n05000001", "n05000002"],
    "val": ["n03000001", "n03000000"],
    "test": ["n09000000", "n09000001"],
}
PER_CLASS = 30


def _color(class_index: int) -> tuple[int, int, int]:
    """A distinct flat colour per fake class, so decoded pixels reveal the class."""
    return (40 * class_index % 256, 255 - 25 * class_index, 90 + 15 * class_index)


def _write_fake(tmp, image_px: int, skip: set[str] = frozenset(), blank: bool = False):
    """CSVs in tmp/csv and images in tmp/root/miniimagenet/images, laid out like the real data."""
    csv_dir, images = tmp / "csv", tmp / "root" / "miniimagenet" / "images"
    csv_dir.mkdir(parents=True)
    images.mkdir(parents=True)
    all_wnids = [w for split in ("train", "val", "test") for w in sorted(FAKE_WNIDS[split])]
    for split, wnids in FAKE_WNIDS.items():
        with open(csv_dir / f"{split}.csv", "w", newline="") as f:
            out = csv.writer(f, lineterminator="\n")
            out.writerow(["filename", "label"])
            for wnid in wnids:
                for i in range(PER_CLASS):
                    name = f"{wnid}{i + 1:08d}.jpg"
                    out.writerow([name, wnid])
                    if name in skip:
                        continue
                    if blank:  # existence checks only
                        (images / name).touch()
                    else:
                        Image.new("RGB", (image_px, image_px), _color(all_wnids.index(wnid))).save(images / name, quality=95)
    return csv_dir, tmp / "root"


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return _write_fake(tmp_path_factory.mktemp("mini"), image_px=60)


def test_fake_split_loads_as_rgb_84_with_fixed_labels(fake):
    csv_dir, root = fake
    train = load_miniimagenet("train", data_root=root, csv_dir=csv_dir)
    assert len(train) == 5 * PER_CLASS
    assert train.labels.dtype == torch.int64 and train.labels.shape == (5 * PER_CLASS,)
    assert train.classes == [0, 1, 2, 3, 4]
    # class id c is the c-th sorted wnid of train; CSV order is kept
    assert train.wnids[:5] == sorted(FAKE_WNIDS["train"])
    assert train.labels[:PER_CLASS].eq(4).all()  # the CSV starts with n05000004
    x = train.load(torch.tensor([0, PER_CLASS, 4 * PER_CLASS + 7]))
    assert x.shape == (3, 3, 84, 84) and x.dtype == torch.float32  # 60x60 files resized
    assert 0.0 <= x.min() and x.max() <= 1.0
    for image, label in zip(x, train.labels[[0, PER_CLASS, 4 * PER_CLASS + 7]]):
        expected = torch.tensor(_color(int(label)), dtype=torch.float32) / 255
        assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=0.03)


def test_fake_splits_have_disjoint_ids_in_train_val_test_order(fake):
    csv_dir, root = fake
    splits = miniimagenet_splits(csv_dir)
    assert splits == {"train": [0, 1, 2, 3, 4], "val": [5, 6], "test": [7, 8]}
    for split in ("val", "test"):
        data = load_miniimagenet(split, data_root=root, csv_dir=csv_dir)
        assert data.classes == splits[split]


def test_image_size_other_than_84(fake):
    csv_dir, root = fake
    val = load_miniimagenet("val", data_root=root, image_size=32, csv_dir=csv_dir)
    assert val.load(torch.arange(4)).shape == (4, 3, 32, 32)
    native = load_miniimagenet("val", data_root=root, image_size=60, csv_dir=csv_dir)
    assert native.load(torch.arange(2)).shape == (2, 3, 60, 60)


def test_episode_sampler_gives_5_way_1_shot_batches(fake):
    csv_dir, root = fake
    train = load_miniimagenet("train", data_root=root, csv_dir=csv_dir)
    sampler = EpisodeSampler(train, miniimagenet_splits(csv_dir)["train"], n_way=5, k_shot=1, q_queries=3)
    batch = sampler.sample(2, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (2, 5, 3, 84, 84) and batch.query_x.shape == (2, 15, 3, 84, 84)
    assert batch.support_y.tolist() == [[0, 1, 2, 3, 4]] * 2
    assert batch.query_y.shape == (2, 15)
    again = sampler.sample(2, torch.Generator().manual_seed(0))
    assert torch.equal(batch.query_x, again.query_x)


def test_shipped_csvs_are_the_ravi_larochelle_split():
    for split, digest in SHIPPED_SHA256.items():
        assert hashlib.sha256((SHIPPED_CSV_DIR / f"{split}.csv").read_bytes()).hexdigest() == digest
    splits = miniimagenet_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 64, "val": 16, "test": 20}
    check_disjoint(splits)
    assert sorted(c for v in splits.values() for c in v) == list(range(100))
    wnids, names = miniimagenet_wnids(), set()
    assert len(set(wnids)) == 100
    for split, ids in splits.items():
        rows = read_split_csv(split)
        counts = {}
        for name, wnid in rows:
            counts[wnid] = counts.get(wnid, 0) + 1
            assert name.startswith(wnid) and name.endswith(".jpg") and len(name) == len(wnid) + 8 + 4
        assert sorted(counts) == [wnids[c] for c in ids]
        assert set(counts.values()) == {600}
        names |= {name for name, _ in rows}
    assert len(names) == 60_000


def test_bad_split_and_image_size():
    with pytest.raises(ValueError, match="allowed: train, val, test"):
        load_miniimagenet("training")
    with pytest.raises(ValueError, match="image_size"):
        load_miniimagenet("train", image_size=0)


def test_missing_images_folder_is_one_clear_error(tmp_path):
    csv_dir, root = _write_fake(tmp_path, image_px=8, blank=True)
    (root / "miniimagenet" / "images").rename(root / "miniimagenet" / "elsewhere")
    with pytest.raises(DataError) as err:
        load_miniimagenet("train", data_root=root, csv_dir=csv_dir)
    message = str(err.value)
    assert str(root / "miniimagenet" / "images") in message
    assert "ILSVRC-2012" in message and "images/" in message and "meta-learning-lstm" in message


def test_missing_images_name_the_first_and_count(tmp_path):
    gone = {"n0500000300000007.jpg", "n0500000100000030.jpg"}
    csv_dir, root = _write_fake(tmp_path, image_px=8, skip=gone, blank=True)
    with pytest.raises(DataError) as err:
        load_miniimagenet("train", data_root=root, csv_dir=csv_dir)
    message = str(err.value)
    # the first missing one in CSV order (n05000003 comes before n05000001 in train.csv)
    assert "n0500000300000007.jpg" in message and "2 of the 150" in message
    assert str(root / "miniimagenet" / "images" / "n0500000300000007.jpg") in message
    assert "ILSVRC-2012" in message
    # the other splits are complete and still load
    assert len(load_miniimagenet("test", data_root=root, csv_dir=csv_dir)) == 2 * PER_CLASS


def test_images_are_decoded_only_on_load(tmp_path):
    csv_dir, root = _write_fake(tmp_path, image_px=8, blank=True)  # empty files: not images
    data = load_miniimagenet("val", data_root=root, csv_dir=csv_dir)
    with pytest.raises(DataError, match="cannot read image .*n0300000100000001.jpg"):
        data.load(torch.tensor([0]))


def test_overlapping_or_malformed_csvs_are_rejected(tmp_path):
    csv_dir, _ = _write_fake(tmp_path, image_px=8, blank=True)
    (csv_dir / "test.csv").write_text("filename,label\nn0300000000000001.jpg,n03000000\n")
    with pytest.raises(DataError, match="n03000000 is in both"):
        miniimagenet_splits(csv_dir)
    (csv_dir / "test.csv").write_text("file,wnid\n")
    with pytest.raises(DataError, match="header"):
        miniimagenet_splits(csv_dir)
    (csv_dir / "test.csv").unlink()
    with pytest.raises(DataError, match="test.csv"):
        miniimagenet_splits(csv_dir)
