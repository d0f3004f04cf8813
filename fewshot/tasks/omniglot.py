"""Omniglot (Lake et al. 2015) as few-shot tasks, the way MAML and Vinyals et al. 2016 use it.

- Read from the two upstream zips (``images_background.zip``, ``images_evaluation.zip``)
  under ``<data root>/omniglot/``, checked against their sha256, PNGs read straight
  from the zips.
- Decoded once into a uint8 array (32,460 x 28 x 28: 105x105 drawings resized to 28x28
  with Lanczos filtering, inverted so ink is bright, as MAML's data code does) in the
  cache folder, built to a temporary file and renamed, memory-mapped on later runs.
- Classes are the 1,623 characters (id = the 4-digit character id in the file name,
  minus 1), each x 4 rotations by 0/90/180/270 degrees (Santoro et al. 2016, used by
  MAML): 6,492 classes. A character's rotations stay in its character's split.
- The split of MAML / Vinyals et al.: 1,200 characters for meta-training (100 of
  them carved out for meta-validation) and the other 423 for meta-test, drawn by a
  fixed seeded permutation of the characters.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fewshot.checkpoint import atomic_write_bytes
from fewshot.tasks.data_root import cache_root, data_root, require_file
from fewshot.tasks.episodes import EpisodeSampler, check_disjoint

ZIPS = {
    "images_background.zip": "7a4cae547f16207901bd3acaabd866c1dbbef4d559dff26d797dbc6423a64a1e",
    "images_evaluation.zip": "d84af890b3ea334eca90f1cb04c6111603a1b620d66b82f86414b8707fbd0e8d",
}
HOW_TO_GET = (
    "Get images_background.zip and images_evaluation.zip from https://github.com/brendenlake/omniglot "
    "(folder python/) and put them in <data root>/omniglot/."
)
N_CHARACTERS, N_IMAGES, IMAGE_SIZE = 1623, 32460, 28
ROTATIONS = 4
SPLIT_SIZES = {"train": 1100, "val": 100, "test": 423}  # 1,200 meta-training characters = train + val
SPLIT_SEED = 1
CACHE_NAME = f"omniglot{IMAGE_SIZE}_v1"


@dataclass
class OmniglotCollection:
    """Omniglot examples: image ``i`` rotated by ``r`` quarter turns is example ``ROTATIONS * i + r``."""

    images: np.ndarray  # (32460, 28, 28) uint8, ink bright; usually a memory map
    characters: Tensor  # (32460,) character id 0..1622 of each image
    rotations: int = ROTATIONS

    def __post_init__(self):
        r = torch.arange(self.rotations)
        self.labels = (self.characters[:, None] * self.rotations + r).flatten()  # (32460 * rotations,)

    def load(self, indices: Tensor) -> Tensor:
        """(n,) example indices -> (n, 1, 28, 28) float in [0, 1]."""
        indices = torch.as_tensor(indices)
        images = torch.from_numpy(np.ascontiguousarray(self.images[(indices // self.rotations).numpy()]))
        images = images.float().div_(255.0).unsqueeze(1)  # (n, 1, 28, 28)
        turns = indices % self.rotations
        for r in range(1, self.rotations):
            mask = turns == r
            if mask.any():
                images[mask] = torch.rot90(images[mask], r, dims=(2, 3))
        return images


def character_splits(seed: int = SPLIT_SEED) -> dict[str, list[int]]:
    """Character ids of the meta-train, meta-val and meta-test splits (1100 / 100 / 423)."""
    order = torch.randperm(N_CHARACTERS, generator=torch.Generator().manual_seed(seed)).tolist()
    train, val = SPLIT_SIZES["train"], SPLIT_SIZES["val"]
    splits = {"train": sorted(order[:train]), "val": sorted(order[train : train + val]), "test": sorted(order[train + val :])}
    check_disjoint(splits)
    return splits


def class_splits(rotations: int = ROTATIONS) -> dict[str, list[int]]:
    """Class ids (character x rotation) of each split; a character's rotations share its split."""
    return {name: [c * rotations + r for c in chars for r in range(rotations)] for name, chars in character_splits().items()}


def load_omniglot(root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, rotations: bool = True) -> OmniglotCollection:
    """The Omniglot collection, decoding the zips into the cache on first use."""
    images, characters = _cached_arrays(data_root(root) / "omniglot", cache_root(cache_dir) / "omniglot")
    return OmniglotCollection(images, torch.from_numpy(characters.astype(np.int64)), ROTATIONS if rotations else 1)


def omniglot_tasks(
    split: str, n_way: int, k_shot: int, q_queries: int, root=None, cache_dir=None, rotations: bool = True
) -> EpisodeSampler:
    """N-way K-shot episodes over one split of Omniglot (``split``: train, val or test)."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_SIZES)}, got {split!r}")
    collection = load_omniglot(root, cache_dir, rotations)
    classes = class_splits(collection.rotations)[split]
    return EpisodeSampler(collection, classes, n_way, k_shot, q_queries)


# --------------------------------------------------------------------------- the cache


def _cached_arrays(data_dir: Path, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = cache_dir / f"{CACHE_NAME}_images.npy", cache_dir / f"{CACHE_NAME}_characters.npy"
    if not (images_path.is_file() and labels_path.is_file()):
        zips = [require_file(data_dir / name, HOW_TO_GET, digest) for name, digest in ZIPS.items()]
        images, characters = _decode(zips)
        cache_dir.mkdir(parents=True, exist_ok=True)
        _save_npy_atomically(labels_path, characters)
        _save_npy_atomically(images_path, images)  # written last: its presence means the cache is complete
    images = np.load(images_path, mmap_mode="r")
    characters = np.load(labels_path)
    if images.shape != (N_IMAGES, IMAGE_SIZE, IMAGE_SIZE) or characters.shape != (N_IMAGES,):
        raise ValueError(f"{images_path}: unexpected shape {images.shape}; delete the cache folder {cache_dir} to rebuild it")
    return images, characters


def _decode(zips: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Every PNG of the zips -> (32460, 28, 28) uint8 (ink bright) and (32460,) character ids, in file-name order."""
    from PIL import Image

    images, characters = [], []
    for path in zips:
        with zipfile.ZipFile(path) as archive:
            for name in sorted(n for n in archive.namelist() if n.endswith(".png")):
                with Image.open(io.BytesIO(archive.read(name))) as img:
                    small = img.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), resample=Image.LANCZOS)
                images.append(255 - np.asarray(small, dtype=np.uint8))
                characters.append(int(Path(name).name.split("_")[0]) - 1)
    if len(images) != N_IMAGES or len(set(characters)) != N_CHARACTERS:
        raise ValueError(f"expected {N_IMAGES} images of {N_CHARACTERS} characters in {zips}, found {len(images)} of {len(set(characters))}")
    return np.stack(images), np.asarray(characters, dtype=np.int16)


def _save_npy_atomically(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())
