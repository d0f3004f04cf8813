"""Omniglot from the shared upstream zips (../shared/data/omniglot, or $FEWSHOT_DATA)."""

import shutil

import pytest
import torch

from conftest import SHARED_DATA as DATA
from fewshot.tasks import omniglot
from fewshot.tasks.data_root import DataError


@pytest.fixture
def cache(omniglot_cache):
    return omniglot_cache


def test_counts_of_images_characters_and_splits(cache):
    collection = omniglot.load_omniglot(DATA, cache)
    assert collection.images.shape == (32460, 28, 28) and len(collection.characters.unique()) == 1623
    assert torch.equal(torch.bincount(collection.characters), torch.full((1623,), 20))  # 20 drawers each
    chars = omniglot.character_splits()
    assert {k: len(v) for k, v in chars.items()} == {"train": 1100, "val": 100, "test": 423}
    classes = omniglot.class_splits()
    assert {k: len(v) for k, v in classes.items()} == {"train": 4400, "val": 400, "test": 1692}  # x4 rotations
    assert not set(classes["train"]) & set(classes["test"]) and not set(classes["val"]) & set(classes["test"])
    assert len(collection.labels) == 4 * 32460


def test_images_are_ink_bright_and_rotations_are_quarter_turns(cache):
    collection = omniglot.load_omniglot(DATA, cache)
    image = collection.load(torch.tensor([0, 1, 2, 3]))  # image 0 rotated by 0, 90, 180, 270 degrees
    assert image.shape == (4, 1, 28, 28) and 0.0 <= image.min() and image.max() <= 1.0
    assert image[0].mean() < 0.3  # mostly background (dark), some ink
    for r in range(1, 4):
        assert torch.equal(image[r], torch.rot90(image[0], r, dims=(1, 2)))


def test_episodes_from_the_test_split_use_only_test_characters(cache):
    tasks = omniglot.omniglot_tasks("test", n_way=20, k_shot=5, q_queries=5, root=DATA, cache_dir=cache)
    episodes = tasks.sample_indices(50, torch.Generator().manual_seed(0))
    characters = tasks.collection.labels[episodes.support_idx] // 4
    assert set(characters.flatten().tolist()) <= set(omniglot.character_splits()["test"])
    batch = tasks.load(episodes)
    assert batch.support_x.shape == (50, 100, 1, 28, 28) and batch.query_x.shape == (50, 100, 1, 28, 28)


def test_cache_is_memory_mapped_and_a_leftover_temp_file_is_ignored(cache, tmp_path):
    shutil.copytree(cache, tmp_path / "c", dirs_exist_ok=True)
    (tmp_path / "c" / "omniglot" / f".{omniglot.CACHE_NAME}_images.npy.123.tmp").write_bytes(b"half written")
    collection = omniglot.load_omniglot(DATA, tmp_path / "c")
    assert type(collection.images).__name__ == "memmap"


def test_missing_zip_names_file_place_and_source(tmp_path):
    with pytest.raises(DataError, match=r"missing dataset file images_background.zip: looked for .*omniglot/images_background.zip .*github.com/brendenlake/omniglot"):
        omniglot.load_omniglot(tmp_path / "nodata", tmp_path / "cache")
    assert not (tmp_path / "cache" / "omniglot").exists() or not any((tmp_path / "cache" / "omniglot").iterdir())


def test_corrupt_zip_is_caught_by_checksum(tmp_path):
    (tmp_path / "data" / "omniglot").mkdir(parents=True)
    for name in omniglot.ZIPS:
        shutil.copy(DATA / "omniglot" / name, tmp_path / "data" / "omniglot" / name)
    with open(tmp_path / "data" / "omniglot" / "images_evaluation.zip", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(DataError, match="corrupt dataset file .*images_evaluation.zip: sha256"):
        omniglot.load_omniglot(tmp_path / "data", tmp_path / "cache")


def test_data_root_comes_from_the_environment(monkeypatch, cache):
    monkeypatch.setenv("FEWSHOT_DATA", str(DATA))
    monkeypatch.setenv("FEWSHOT_CACHE", str(cache))
    assert len(omniglot.load_omniglot().labels) == 4 * 32460


def test_unknown_split_is_named():
    with pytest.raises(ValueError, match="split must be one of train, val, test"):
        omniglot.omniglot_tasks("validation", 5, 1, 1)
