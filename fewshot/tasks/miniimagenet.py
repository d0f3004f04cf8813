"""miniImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle (2017).

100 ImageNet classes, 600 images each: 64 meta-train, 16 meta-val and 20
meta-test classes. The split is fixed by three CSVs (``filename,label`` rows,
label = WordNet id) copied unchanged from twitter/meta-learning-lstm; they ship
with this package in ``fewshot/tasks/splits/miniimagenet`` (see the README
there for source, license and checksums).

The images are ImageNet (ILSVRC-2012) images and cannot be redistributed: put
them, as the upstream README says, in one flat folder ``images/``, here
``<data root>/miniimagenet/images/<filename>`` with the file names of the CSVs
(e.g. ``n0153282900000005.jpg``), usually already resized to 84x84.

Class ids, fixed: the train classes are 0..63, val 64..79, test 80..99, each
split's classes numbered in sorted WordNet-id order (``miniimagenet_wnids()[c]``
is the WordNet id of class c). Train ids 0..63 can thus label a 64-way
classifier directly, and the splits' ids are disjoint.

Example::

    train = load_miniimagenet("train")
    tasks = EpisodeSampler(train, miniimagenet_splits()["train"], n_way=5, k_shot=1, q_queries=15)
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from fewshot.tasks.data_root import DataError, data_root as resolve_data_root, require_file
from fewshot.tasks.episodes import check_disjoint
from fewshot.tasks.folder import _as_index_list, _check_image_size, read_images

SPLITS = ("train", "val", "test")
SHIPPED_CSV_DIR = Path(__file__).parent / "splits" / "miniimagenet"
SHIPPED_SHA256 = {
    "train": "498519cd8e49ce97ed26a4a3638966698ae41ab35e9c68538319fc9b46ba7d2f",
    "val": "5658a59921ca027ee76af92949869c5d6f41d77592ff3b18db325a9d10c893b9",
    "test": "2b7cfa78342995761a572a8158e539bc4e0a80f9bbd7d00c1e17a460fbbb93fa",
}
HOW_TO_GET_IMAGES = (
    "The miniImageNet images are ImageNet (ILSVRC-2012) images, which may not be redistributed: obtain ILSVRC-2012 "
    "from https://image-net.org under its terms of use, make the miniImageNet images from it (84x84, named as in the "
    "split CSVs, e.g. n0153282900000005.jpg), and put them all in one flat folder {images_dir} (the upstream README "
    "of twitter/meta-learning-lstm says to put them in images/). The data root comes from data_root= / --data-root, "
    "else $FEWSHOT_DATA, else the per-user data folder."
)


# ----------------------------------------------------------------------------- CSVs


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown miniImageNet split {split!r}; allowed: {', '.join(SPLITS)}")


def _csv_path(split: str, csv_dir: str | os.PathLike | None) -> Path:
    """The split's CSV, checked: present, and for the shipped copies, unchanged."""
    if csv_dir is None:
        how = "It ships with fewshot (fewshot/tasks/splits/miniimagenet); reinstall fewshot or pass csv_dir."
        return require_file(SHIPPED_CSV_DIR / f"{split}.csv", how, SHIPPED_SHA256[split])
    how = "Pass the folder holding train.csv, val.csv and test.csv as csv_dir, or csv_dir=None for the shipped split."
    return require_file(Path(csv_dir) / f"{split}.csv", how)


def read_split_csv(split: str, csv_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The (filename, wnid) rows of a split's CSV, in file order; ``csv_dir=None`` reads the shipped copy."""
    _check_split(split)
    path = _csv_path(split, csv_dir)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != ["filename", "label"]:
        got = repr(",".join(rows[0])) if rows else "an empty file"
        raise DataError(f"{path}: expected the header 'filename,label', got {got}")
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0] or not row[1]:
            raise DataError(f"{path}, line {line}: expected 'filename,label', got {','.join(row)!r}")
    seen: set[str] = set()
    for line, (name, _) in enumerate(rows[1:], start=2):
        if name in seen:
            raise DataError(f"{path}, line {line}: file name {name} appears twice")
        seen.add(name)
    return [(r[0], r[1]) for r in rows[1:]]


def _read_splits(csv_dir: str | os.PathLike | None) -> dict[str, list[tuple[str, str]]]:
    """The rows of all three split CSVs."""
    return {split: read_split_csv(split, csv_dir) for split in SPLITS}


def _split_wnids(rows: dict[str, list[tuple[str, str]]]) -> dict[str, list[str]]:
    """Each split's WordNet ids, sorted; a WordNet id in two splits is an error."""
    wnids = {split: sorted({wnid for _, wnid in rows[split]}) for split in SPLITS}
    seen: dict[str, str] = {}
    for split, names in wnids.items():
        for wnid in names:
            if wnid in seen:
                both = f"both the {seen[wnid]!r} and the {split!r} CSV"
                raise DataError(f"class {wnid} is in {both}; splits must share no class")
            seen[wnid] = split
    return wnids


def miniimagenet_wnids(csv_dir: str | os.PathLike | None = None) -> list[str]:
    """WordNet id of every class id: train classes first (sorted), then val, then test."""
    wnids = _split_wnids(_read_splits(csv_dir))
    return [wnid for split in SPLITS for wnid in wnids[split]]


def miniimagenet_splits(csv_dir: str | os.PathLike | None = None) -> dict[str, list[int]]:
    """The class ids of each split: {"train": [0..63], "val": [64..79], "test": [80..99]} for the shipped CSVs."""
    wnids = _split_wnids(_read_splits(csv_dir))
    splits, start = {}, 0
    for split in SPLITS:
        splits[split] = list(range(start, start + len(wnids[split])))
        start += len(wnids[split])
    check_disjoint(splits)
    return splits


# --------------------------------------------------------------------------- images


def _check_images(images_dir: Path, filenames: Sequence[str], split: str) -> None:
    """One DataError if the folder or any image of the split is missing (one directory listing, no decoding)."""
    how = HOW_TO_GET_IMAGES.format(images_dir=images_dir)
    if not images_dir.is_dir():
        raise DataError(f"missing miniImageNet images folder: looked for {images_dir}. {how}")
    with os.scandir(images_dir) as entries:
        present = {e.name for e in entries}
    missing = [name for name in filenames if name not in present]
    if missing:
        raise DataError(
            f"missing miniImageNet image {missing[0]} ({len(missing)} of the {len(filenames)} images of split "
            f"{split!r} are missing): looked for {images_dir / missing[0]}. {how}"
        )


@dataclass
class MiniImageNet:
    """One split of miniImageNet as a collection: images decoded with PIL on ``load``, not before."""

    paths: list[Path]  # (n_examples,) image files
    labels: Tensor  # (n_examples,) int64 class ids
    wnids: list[str]  # class id -> WordNet id, all classes of all splits
    split: str
    image_size: int = 84

    @property
    def classes(self) -> list[int]:
        """The class ids of this split, sorted."""
        return torch.unique(self.labels).tolist()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, indices: Tensor | Sequence[int]) -> Tensor:
        """The images at ``indices``: float (len(indices), 3, image_size, image_size) RGB in [0, 1]."""
        return read_images([self.paths[i] for i in _as_index_list(indices)], self.image_size)


def load_miniimagenet(
    split: str,
    data_root: str | os.PathLike | None = None,
    image_size: int = 84,
    csv_dir: str | os.PathLike | None = None,
) -> MiniImageNet:
    """The ``split`` ("train", "val" or "test") of miniImageNet, checked for missing images.

    Args:
        split: which class split.
        data_root: the data root (images in ``<data_root>/miniimagenet/images``); None:
            ``$FEWSHOT_DATA``, else the per-user data folder.
        image_size: images are resized (bilinear) to image_size x image_size unless already that size.
        csv_dir: a folder with train.csv, val.csv and test.csv; None: the shipped Ravi & Larochelle split.
    """
    _check_split(split)
    if image_size is None:
        raise ValueError("image_size must be a positive integer, got None")
    _check_image_size(image_size)
    all_rows = _read_splits(csv_dir)
    wnids = [wnid for names in _split_wnids(all_rows).values() for wnid in names]  # class id -> wnid
    class_id = {wnid: c for c, wnid in enumerate(wnids)}
    rows = all_rows[split]
    images_dir = resolve_data_root(data_root) / "miniimagenet" / "images"
    _check_images(images_dir, [name for name, _ in rows], split)
    return MiniImageNet(
        paths=[images_dir / name for name, _ in rows],
        labels=torch.tensor([class_id[wnid] for _, wnid in rows], dtype=torch.int64),
        wnids=wnids,
        split=split,
        image_size=image_size,
    )
