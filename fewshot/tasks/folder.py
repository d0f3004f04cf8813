"""Bring your own data: a folder of images per class, or any ``torch.utils.data.Dataset``.

Both are *collections* (see ``fewshot.tasks.episodes``): ``labels`` holds one
class id per example and ``load(indices)`` returns the examples stacked, so an
``EpisodeSampler`` turns them into N-way K-shot tasks. ``split_classes`` draws a
seeded train/val/test class split; ``validate_splits`` checks a split of your own.
Meta-test classes must never be seen in meta-training: every split is checked
with ``check_disjoint``.

Example::

    images = ImageFolderCollection("birds/", image_size=84)
    splits = split_classes(len(images.class_names), fractions=(0.6, 0.2, 0.2), seed=0)
    train_tasks = EpisodeSampler(images, splits["train"], n_way=5, k_shot=1, q_queries=15)
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fewshot.tasks.data_root import DataError
from fewshot.tasks.episodes import check_disjoint

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
SPLIT_NAMES = ("train", "val", "test")
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR  # Pillow < 9.1 has no Image.Resampling


# ---------------------------------------------------------------------------- images


def read_image(path: Path, image_size: int | None = None, grayscale: bool = False) -> Tensor:
    """One image file as float (C, H, W) in [0, 1]; C = 1 if ``grayscale`` else 3 (RGB).

    Resized (bilinear, antialiased) to ``image_size`` x ``image_size`` unless it
    already is, or ``image_size`` is None. A file PIL cannot read raises DataError.
    """
    try:
        with Image.open(path) as img:
            img = img.convert("L" if grayscale else "RGB")
            if image_size is not None and img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), _BILINEAR)
            pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W) or (H, W, 3)
    except OSError as e:  # missing, truncated or not an image (PIL's UnidentifiedImageError is an OSError)
        raise DataError(f"cannot read image {path}: {e}") from e
    pixels = pixels.unsqueeze(-1) if pixels.ndim == 2 else pixels  # (H, W, C)
    return pixels.permute(2, 0, 1).float().div_(255.0)  # (C, H, W)


def read_images(paths: Sequence[Path], image_size: int | None = None, grayscale: bool = False) -> Tensor:
    """Image files stacked as float (len(paths), C, H, W); without ``image_size`` they must share one size."""
    if not paths:
        channels = 1 if grayscale else 3
        return torch.empty(0, channels, image_size or 0, image_size or 0)
    images = [read_image(p, image_size, grayscale) for p in paths]
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        first = images[0].shape
        other = next(i for i, x in enumerate(images) if x.shape != first)
        raise ValueError(
            f"images differ in size: {paths[0]} is {tuple(first[1:])}, {paths[other]} is {tuple(images[other].shape[1:])}; "
            "pass image_size to resize them all"
        )
    return torch.stack(images)


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and not (isinstance(image_size, int) and not isinstance(image_size, bool) and image_size >= 1):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")


def _as_index_list(indices: Tensor | Sequence[int]) -> list[int]:
    return torch.as_tensor(indices, dtype=torch.int64).reshape(-1).tolist()


# ---------------------------------------------------------------------- image folder


def _image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name (hidden files skipped)."""
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.is_file() and not e.name.startswith(".")]
    return [folder / n for n in sorted(names) if Path(n).suffix.lower() in IMAGE_EXTENSIONS]


class ImageFolderCollection:
    """One sub-folder of ``root`` per class, holding that class's images; decoded on ``load``.

    Class ids are the sorted sub-folder names numbered 0..C-1 (``class_names[c]``
    is class c); files are taken in name order, so the example indices are stable.
    Only files with an image extension (``IMAGE_EXTENSIONS``, any case) directly
    in a class folder are used; hidden entries are skipped.

    Args:
        root: the folder of class folders.
        image_size: resize every image to image_size x image_size; None keeps the
            files' size, which must then be the same for all images loaded together.
        grayscale: one channel (PIL mode "L") instead of three (RGB).
    """

    def __init__(self, root: str | os.PathLike, image_size: int | None = None, grayscale: bool = False):
        _check_image_size(image_size)
        self.root, self.image_size, self.grayscale = Path(root), image_size, grayscale
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a folder")
        with os.scandir(self.root) as entries:
            self.class_names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        if not self.class_names:
            raise ValueError(f"{self.root} has no class sub-folders; expected one sub-folder of images per class")
        self.paths: list[Path] = []
        labels: list[int] = []
        for c, name in enumerate(self.class_names):
            files = _image_files(self.root / name)
            if not files:
                raise ValueError(
                    f"class folder {self.root / name} holds no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            self.paths += files
            labels += [c] * len(files)
        self.labels = torch.tensor(labels, dtype=torch.int64)  # (n_examples,)

    @property
    def classes(self) -> list[int]:
        """All class ids, 0..C-1."""
        return list(range(len(self.class_names)))

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, indices: Tensor | Sequence[int]) -> Tensor:
        """The images at ``indices``: float (len(indices), C, H, W) in [0, 1]."""
        return read_images([self.paths[i] for i in _as_index_list(indices)], self.image_size, self.grayscale)


# ------------------------------------------------------------------------- datasets


def _as_class_id(label, index: int, where: str = "dataset item") -> int:
    """``label`` as a non-negative int, or a ValueError naming where it is (``where`` and ``index``)."""
    if isinstance(label, (Tensor, np.ndarray, np.generic)):
        array = label.detach().cpu().numpy() if isinstance(label, Tensor) else np.asarray(label)
        if array.size == 1 and array.dtype.kind in "iu":
            label = int(array.reshape(()))
    if not isinstance(label, numbers.Integral) or isinstance(label, bool):
        raise ValueError(f"{where} {index}: label {label!r} is not an integer class id")
    if label < 0:
        raise ValueError(f"{where} {index}: label {label} is negative; class ids must be >= 0")
    return int(label)


def _dataset_labels(dataset) -> Tensor:
    """(len(dataset),) int64 class ids: from ``dataset.targets`` if present, else item[1] of every item."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        labels = [_as_class_id(dataset[i][1], i) for i in range(len(dataset))]
    elif isinstance(targets, Tensor) and targets.ndim == 1 and targets.dtype in _INTEGER_DTYPES:
        labels = targets.to(torch.int64, copy=True)
        if len(labels) and labels.min() < 0:
            i = int(torch.nonzero(labels < 0)[0])
            raise ValueError(f"dataset item {i}: label {int(labels[i])} is negative; class ids must be >= 0")
    else:
        labels = [_as_class_id(t, i) for i, t in enumerate(targets)]
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if len(labels) != len(dataset):
        raise ValueError(f"dataset.targets has {len(labels)} labels but the dataset has {len(dataset)} items")
    return labels


class DatasetCollection:
    """Any map-style ``torch.utils.data.Dataset`` whose items are ``(x, label)`` with an integer label.

    Labels come from ``dataset.targets`` when it has one (torchvision datasets
    do), else from reading every item once here. ``load`` stacks
    ``torch.as_tensor(x).float()`` of the items: x must be a tensor or array
    (apply e.g. a ToTensor transform to PIL images); values are not rescaled.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self.labels = _dataset_labels(dataset)  # (n_examples,) int64

    @property
    def classes(self) -> list[int]:
        """The class ids that occur, sorted."""
        return torch.unique(self.labels).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: Tensor | Sequence[int]) -> Tensor:
        """The items' x at ``indices``, stacked: float (len(indices), *x_shape)."""
        xs = [torch.as_tensor(self.dataset[i][0]).float() for i in _as_index_list(indices)]
        if not xs:
            return torch.empty(0)
        return torch.stack(xs)


# --------------------------------------------------------------------------- splits


def _class_list(classes: int | Sequence[int]) -> list[int]:
    if isinstance(classes, numbers.Integral) and not isinstance(classes, bool):
        if classes < 0:
            raise ValueError(f"the number of classes must be >= 0, got {classes}")
        return list(range(int(classes)))
    out = [_as_class_id(c, i, "class list entry") for i, c in enumerate(classes)]
    check_disjoint({"classes": out})  # no duplicates
    return out


def _counts_from_fractions(fractions: Sequence[float], n: int) -> list[int]:
    """Largest-remainder rounding of ``fractions * n``: the counts sum to n exactly."""
    if len(fractions) != 3 or any(not isinstance(f, numbers.Real) or not (f >= 0) for f in fractions):
        raise ValueError(f"fractions must be three numbers >= 0 (train, val, test), got {fractions!r}")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {fractions!r} (sum {sum(fractions)})")
    exact = [f * n for f in fractions]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(3), key=lambda i: counts[i] - exact[i])  # largest remainder first, ties in order
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _check_counts(counts: Sequence[int], n: int) -> list[int]:
    if len(counts) != 3 or any(not isinstance(c, numbers.Integral) or isinstance(c, bool) or c < 0 for c in counts):
        raise ValueError(f"counts must be three integers >= 0 (train, val, test), got {counts!r}")
    if sum(counts) > n:
        raise ValueError(f"counts {tuple(counts)} ask for {sum(counts)} classes but there are only {n}")
    return [int(c) for c in counts]


def split_classes(
    classes: int | Sequence[int],
    fractions: Sequence[float] | None = None,
    *,
    counts: Sequence[int] | None = None,
    seed: int = 0,
) -> dict[str, list[int]]:
    """A seeded random split of the classes into disjoint train, val and test class lists.

    Args:
        classes: the class ids, or their number C (meaning 0..C-1).
        fractions: (train, val, test) shares of the classes, summing to 1; counts
            are rounded so they add up to all classes. Default (0.64, 0.16, 0.20),
            the proportions of miniImageNet.
        counts: (train, val, test) numbers of classes instead of fractions; classes
            beyond their sum are left out.
        seed: seeds the ``torch.Generator`` of the shuffle: same seed, same split.

    Returns:
        {"train": [...], "val": [...], "test": [...]}, each list sorted.
    """
    pool = _class_list(classes)
    if fractions is not None and counts is not None:
        raise ValueError("give fractions or counts, not both")
    if counts is None:
        counts = _counts_from_fractions((0.64, 0.16, 0.20) if fractions is None else fractions, len(pool))
    else:
        counts = _check_counts(counts, len(pool))
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(int(seed))).tolist()
    shuffled = [pool[i] for i in order]
    splits, start = {}, 0
    for name, count in zip(SPLIT_NAMES, counts):
        splits[name] = sorted(shuffled[start : start + count])
        start += count
    check_disjoint(splits)
    return splits


def validate_splits(
    splits: Mapping[str, Sequence[int | str]], class_names: Sequence[str] | None = None
) -> dict[str, list[int]]:
    """A split of your own, checked: names among train/val/test, class ids known, no class in two splits.

    Args:
        splits: e.g. {"train": [0, 1, 2], "val": [3], "test": [4, 5]}.
        class_names: the collection's class names (e.g. ``ImageFolderCollection.class_names``):
            entries may then be names as well as ids, and ids must be below len(class_names).

    Returns:
        The splits as lists of int class ids, in the order given.
    """
    unknown = [name for name in splits if name not in SPLIT_NAMES]
    if unknown:
        raise ValueError(f"unknown split name(s) {unknown}; allowed: {', '.join(SPLIT_NAMES)}")
    ids = {name: [_class_id(c, name, class_names) for c in classes] for name, classes in splits.items()}
    check_disjoint(ids)
    return ids


def _class_id(entry: int | str, split: str, class_names: Sequence[str] | None) -> int:
    """One entry of a user's split as a class id."""
    if isinstance(entry, str):
        if class_names is None or entry not in class_names:
            known = "no class names were given" if class_names is None else f"known: {', '.join(class_names)}"
            raise ValueError(f"split {split!r}: unknown class {entry!r} ({known})")
        return list(class_names).index(entry)
    if isinstance(entry, bool):
        raise ValueError(f"split {split!r}: {entry!r} is not a class id")
    try:
        c = operator.index(entry)  # int, NumPy integer or one-element integer tensor
    except TypeError:
        raise ValueError(f"split {split!r}: {entry!r} is not a class id") from None
    if c < 0 or (class_names is not None and c >= len(class_names)):
        allowed = ">= 0" if class_names is None else f"0..{len(class_names) - 1}"
        raise ValueError(f"split {split!r}: class id {c} is out of range; allowed: {allowed}")
    return c
