"""Image sources in a fixed, deterministic order: an image folder, any 🤗 dataset, or the built-in digits.

A source is a picklable list of ``(key, label)`` pairs plus a ``read(i)`` that returns what
:func:`~diffusers_speedup.data.preprocessing.preprocess_image` accepts. It is handed to DataLoader workers, so it
holds paths or a memory-mapped Arrow table, never decoded pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from ..utils import is_saved_dataset
from .preprocessing import IMAGE_EXTENSIONS


@dataclass
class ImageSource:
    """Base class: ``keys[i]`` is a stable identifier of item ``i`` (relative path or row id), ``labels[i]`` its class."""

    keys: list[str]
    labels: list[int]
    class_names: list[str] | None
    description: dict
    # Entries found unusable while listing (e.g. unreadable folders): {"path": ..., "reason": ...}.
    listing_rejected: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, index: int):
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Hash of the description and the ordered (key, label) list: a changed input gives a changed fingerprint."""
        digest = hashlib.sha256(json.dumps(self.description, sort_keys=True).encode())
        for key, label in zip(self.keys, self.labels):
            digest.update(f"{key}\0{label}\n".encode())
        return digest.hexdigest()


class ImageFolderSource(ImageSource):
    """ImageNet train layout: ``root/<class>/**/<image>``; class id = index of ``<class>`` among sorted sub-folders.

    Files are sorted within each class folder (recursively); files whose extension is not an image extension
    (``IMAGE_EXTENSIONS``) are ignored; unreadable sub-folders are recorded in ``listing_rejected``. A class folder
    without image files is refused: it would still take a label id (shifting the ids of the classes after it from
    what a folder without it gives) and leave that id untrained, yet sampled as a class.
    """

    def __init__(self, root: str | os.PathLike):
        root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image_folder={root!r} is not a directory")
        try:
            class_names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        except OSError as error:
            raise OSError(f"cannot list image_folder={root!r}: {error}") from error
        if not class_names:
            raise ValueError(f"image_folder={root!r} has no sub-folders; expected one sub-folder per class")
        keys, labels, rejected = [], [], []

        def on_error(error: OSError) -> None:
            path = os.path.relpath(error.filename, root) if error.filename else "?"
            rejected.append({"path": path, "reason": f"unreadable folder ({error.strerror or error})"})

        for label, class_name in enumerate(class_names):
            class_files = []
            for folder, subfolders, files in os.walk(os.path.join(root, class_name), onerror=on_error):
                subfolders.sort()
                for name in files:
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        class_files.append(os.path.relpath(os.path.join(folder, name), root))
            if not class_files:
                unreadable = [entry for entry in rejected if entry["path"].split(os.sep)[0] == class_name]
                why = f" ({unreadable[0]['reason']})" if unreadable else ""
                raise ValueError(
                    f"image_folder={root!r}: the class folder {class_name!r} holds no image files "
                    f"({', '.join(IMAGE_EXTENSIONS)}){why}; a class without images would never train. Add its images "
                    "or move the folder out"
                )
            class_files.sort()
            keys.extend(path.replace(os.sep, "/") for path in class_files)
            labels.extend([label] * len(class_files))
        super().__init__(keys, labels, class_names, {"kind": "image_folder", "root": root}, rejected)
        self.root = root

    def read(self, index: int) -> str:
        return os.path.join(self.root, self.keys[index])


def open_hf_dataset(name_or_path: str, split: str = "train"):
    """Open a 🤗 dataset by Hub name, by ``save_to_disk`` folder, or by a local data folder (parquet, imagefolder)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if os.path.isdir(name_or_path) and is_saved_dataset(name_or_path):
        dataset = load_from_disk(name_or_path)
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise ValueError(f"split={split!r} not in the dataset at {name_or_path!r}; it has {list(dataset)}")
            dataset = dataset[split]
        return dataset
    return load_dataset(name_or_path, split=split)


class HFDatasetSource(ImageSource):
    """Rows of a 🤗 dataset with an image column and an integer or ``ClassLabel`` label column, in row order.

    Images are read undecoded (``Image(decode=False)``) so that corrupt rows are rejected by our own decoder instead
    of crashing the loader.
    """

    def __init__(self, dataset, image_column: str = "image", label_column: str = "label", name: str | None = None):
        from datasets import ClassLabel
        from datasets import Image as ImageFeature

        for role, column in (("image_column", image_column), ("label_column", label_column)):
            if column not in dataset.column_names:
                raise ValueError(f"{role}={column!r} is not a column of the dataset; columns: {dataset.column_names}")
        label_feature = dataset.features[label_column]
        labels = [int(label) for label in dataset[label_column]]
        if isinstance(label_feature, ClassLabel):
            class_names = list(label_feature.names)
        else:
            class_names = [str(label) for label in range(max(labels) + 1)] if labels else []
        if any(label < 0 for label in labels):
            raise ValueError(f"label_column={label_column!r} has negative labels (unlabeled rows are not supported)")
        self.dataset = dataset.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))
        self.image_column = image_column
        prefix = name or "row"
        keys = [f"{prefix}/{index:08d}" for index in range(len(dataset))]
        # Not the Arrow fingerprint: it can change between loads of the same data (datasets#8034); the hashed
        # (key, label) list already identifies the rows.
        description = {"kind": "dataset", "name": name}
        super().__init__(keys, labels, class_names, description)

    def read(self, index: int):
        cell = self.dataset[index][self.image_column]
        if cell.get("bytes") is not None:
            return cell["bytes"]
        if cell.get("path"):
            return cell["path"]
        raise ValueError(f"row {index} has neither image bytes nor a path")


def make_source(
    image_folder: str | None = None,
    dataset: str | None = None,
    builtin: str | None = None,
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    resolution: int | None = None,
) -> ImageSource:
    """Build exactly one source from the three ways of naming the input (CLI arguments of ``cache_latents.py``)."""
    given = [
        name for name, value in (("image_folder", image_folder), ("dataset", dataset), ("builtin", builtin)) if value
    ]
    if len(given) != 1:
        raise ValueError(f"give exactly one of image_folder, dataset, builtin; got {given or 'none'}")
    if image_folder:
        return ImageFolderSource(image_folder)
    if dataset:
        source = HFDatasetSource(open_hf_dataset(dataset, split), image_column, label_column, name=dataset)
        source.description.update(split=split, image_column=image_column, label_column=label_column)
        return source
    from .builtin import load_builtin_dataset

    # Built at the target resolution so no digit is rejected as too small; RGB because VAEs take 3 channels.
    digits = load_builtin_dataset(builtin, resolution=resolution or 32, split=split, channels=3)
    source = HFDatasetSource(digits, "image", "label", name=f"{builtin}/{split}")
    source.description = {"kind": "builtin", "name": builtin, "split": split, "resolution": resolution or 32}
    return source
