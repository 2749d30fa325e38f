"""Find the labeled images of a data set, split them by content hash, feed them to Keras.

A data set is a folder with one subfolder per class (``data.classes`` in params). The
label of a class is its position in that list, never its place in alphabetical order.
An image's split is a function of the sha256 of its bytes and a salt, so adding images
never moves an old one between train, validation and test. Subfolders of the positive
class folder name defect types (``NG/crack/``); labels stay binary.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from tasks.durable import sha256_of
from tasks.errors import FanaoiError
from tasks.params import AugmentParams, DataParams, ImageInput, ModelParams, replace

if TYPE_CHECKING:
    import numpy as np
    import tensorflow as tf

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
# Pillow modes with one channel (gray with alpha counts: training drops the alpha).
_SINGLE_CHANNEL_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
# The defect type of a positive-class image that sits directly in the class folder.
UNTYPED = "untyped"


class DatasetError(FanaoiError):
    """The data folder cannot be used as it is; the message names the path and the fix."""


@dataclass(frozen=True)
class LabeledImage:
    path: Path
    class_name: str
    label: int
    sha256: str
    split: str
    defect_type: str | None = None  # see defect_type_of; None for the negative class


def defect_type_of(relative: PurePath | str, positive_class: str) -> str | None:
    """The defect type of an image from its path relative to the data folder.

    ``NG/crack/a.png`` and ``NG/crack/day2/a.png`` are "crack", ``NG/a.png`` is UNTYPED;
    images of the other class (subfolders there only organise files) have no type.
    """
    parts = PurePath(relative).parts
    if not parts or parts[0] != positive_class:
        return None
    return parts[1] if len(parts) > 2 else UNTYPED


def assign_split(sha256: str, salt: str, fractions: Mapping[str, float]) -> str:
    """Map a content hash to train/validation/test; stable for a given salt and fractions."""
    bucket = int.from_bytes(hashlib.sha256(f"{salt}:{sha256}".encode()).digest()[:8], "big")
    position = bucket / 2**64
    cumulative = 0.0
    for split in SPLITS:
        cumulative += fractions[split]
        if position < cumulative:
            return split
    return SPLITS[-1]


def is_candidate_file(path: Path) -> bool:
    """Hidden files (.DS_Store, editor swap files) are never data."""
    return not path.name.startswith(".")


def class_folders(data_dir: Path, classes: Sequence[str]) -> dict[str, Path]:
    """The class folders, checked: all present, none empty, nothing unexpected beside them."""
    if not data_dir.is_dir():
        raise DatasetError(
            f"{data_dir}: data folder not found; create it with one subfolder per class "
            f"({', '.join(classes)}) or run `fanaoi demo-data {data_dir}`"
        )
    unexpected = sorted(
        p.name for p in data_dir.iterdir() if p.is_dir() and is_candidate_file(p) and p.name not in classes
    )
    if unexpected:
        raise DatasetError(
            f"{data_dir / unexpected[0]}: unknown class folder; the classes are "
            f"{', '.join(classes)} (data.classes in params.yaml): rename or move it out"
        )
    folders = {}
    for name in classes:
        folder = data_dir / name
        if not folder.is_dir():
            raise DatasetError(
                f"{folder}: class folder missing; create it and add {name} images, "
                f"or fix data.classes in params.yaml"
            )
        folders[name] = folder
    return folders


def list_images(data_dir: Path | str, params: DataParams) -> list[LabeledImage]:
    """Every image of the data set with its label, hash and split, in a stable order.

    Files whose extension is not an image extension of params are skipped and counted
    in a warning (the validate stage reports each one).
    """
    data_dir = Path(data_dir)
    mapping = params.class_mapping
    extensions = {e.lower() for e in params.extensions}
    images: list[LabeledImage] = []
    for name, folder in class_folders(data_dir, params.classes).items():
        files = sorted(p for p in folder.rglob("*") if p.is_file() and is_candidate_file(p))
        accepted = [p for p in files if p.suffix.lower() in extensions]
        if len(accepted) < len(files):
            log.warning(
                "%s: skipped %d file(s) that are not %s images",
                folder, len(files) - len(accepted), "/".join(sorted(extensions)),
            )
        if not accepted:
            raise DatasetError(
                f"{folder}: no images in class folder; add {name} images "
                f"({', '.join(sorted(extensions))}) before training"
            )
        for path in accepted:
            digest = sha256_of(path)
            split = assign_split(digest, params.split_salt, params.split)
            kind = defect_type_of(path.relative_to(data_dir), params.positive_class)
            images.append(LabeledImage(path, name, mapping[name], digest, split, kind))
    return images


def select(images: Iterable[LabeledImage], split: str) -> list[LabeledImage]:
    return [image for image in images if image.split == split]


def require_split(images: Sequence[LabeledImage], split: str, data_dir: Path | str) -> None:
    """A split with no image of some class cannot train or score a classifier."""
    present = {image.class_name for image in images}
    if not images or len(present) < 2:
        raise DatasetError(
            f"{data_dir}: the {split} split has {len(images)} image(s) of classes "
            f"{sorted(present) or 'none'}; add more images to each class folder"
        )


def decode_pixels(contents: tf.Tensor, model: ImageInput) -> tf.Tensor:
    """Bytes of a PNG/JPEG/BMP -> uint8 tensor at the model's input size.

    Rounded to 8 bits after the resize, so the training cache holds a quarter of what
    float32 would (100,000 RGB images at 128 px: 4.9 GB instead of 19.7 GB) and still
    gives the model exactly the values inference gives it.
    """
    import tensorflow as tf

    image = tf.io.decode_image(contents, channels=model.channels, expand_animations=False)
    image = tf.image.resize(image, model.input_size, method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def scale_pixels(pixels: tf.Tensor) -> tf.Tensor:
    """uint8 pixels -> float32 in [0, 1], the model's input."""
    import tensorflow as tf

    return tf.cast(pixels, tf.float32) / 255.0


def decode_image(contents: tf.Tensor, model: ImageInput) -> tf.Tensor:
    """Bytes of a PNG/JPEG/BMP -> float32 tensor in [0, 1] at the model's input size.

    The one preprocessing function for training, evaluation and prediction (training
    applies its two halves on either side of its cache).
    """
    return scale_pixels(decode_pixels(contents, model))


def make_dataset(
    images: Sequence[LabeledImage],
    model: ImageInput,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    shuffle_buffer: int = 4096,
    augment: AugmentParams | None = None,
    cache_max_mb: float | None = None,
) -> tf.data.Dataset:
    """tf.data pipeline: parallel read and decode, cache decoded tensors, batch, prefetch.

    The cache keeps uint8 pixels at the input size (``decode_pixels``); past
    ``cache_max_mb`` (None: no limit; 0 for a single pass) nothing is cached and every
    epoch decodes the files again, trading time for memory.

    With ``shuffle_seed`` the order is reshuffled each epoch from that seed, and ``augment``
    (training only) changes each image at random after the cache, from the same seed, so
    every epoch sees new variants and a rerun sees the same ones.
    """
    import tensorflow as tf

    paths = [str(image.path) for image in images]
    labels = [float(image.label) for image in images]
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    dataset = dataset.map(
        lambda path, label: (decode_pixels(tf.io.read_file(path), model), label),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    decoded_mb = len(paths) * model.input_size[0] * model.input_size[1] * model.channels / 1e6
    if cache_max_mb is None or decoded_mb <= cache_max_mb:
        dataset = dataset.cache()
    elif cache_max_mb > 0:  # 0: a single pass, where a cache only costs memory
        log.info("%d images decode to %.0f MB, above train.cache_max_mb %.0f: decoded again "
                 "every epoch, not cached", len(paths), decoded_mb, cache_max_mb)
    if shuffle_seed is not None:
        dataset = dataset.shuffle(
            min(shuffle_buffer, max(len(paths), 1)), seed=shuffle_seed, reshuffle_each_iteration=True
        )
    if augment is not None and augment.active:
        seeds = tf.data.Dataset.random(seed=shuffle_seed or 0, rerandomize_each_iteration=True).batch(2)
        square = model.input_size[0] == model.input_size[1]
        dataset = tf.data.Dataset.zip((dataset, seeds)).map(
            lambda pair, seed: (augment_image(scale_pixels(pair[0]), seed, augment, square), pair[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    else:
        dataset = dataset.map(
            lambda pixels, label: (scale_pixels(pixels), label),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def augment_image(image: tf.Tensor, seed: tf.Tensor, augment: AugmentParams, square: bool) -> tf.Tensor:
    """One random variant of a decoded [0, 1] image, drawn with stateless ops from ``seed``.

    Flips and quarter turns keep every pixel (an inspected part has no up or left);
    quarter turns only when the input is square, so the shape never changes. Shifts
    reflect at the border rather than padding with black a camera never shows.
    """
    import tensorflow as tf

    flip_lr, flip_ud, turn, shift, light, contrast = tf.unstack(
        tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=6)
    )
    if augment.flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_lr)
        image = tf.image.stateless_random_flip_up_down(image, flip_ud)
    if augment.rot90 and square:
        quarter_turns = tf.random.stateless_uniform([], turn, minval=0, maxval=4, dtype=tf.int32)
        image = tf.image.rot90(image, quarter_turns)
    if augment.shift > 0:
        height, width = image.shape[0], image.shape[1]
        pad_y, pad_x = max(1, round(height * augment.shift)), max(1, round(width * augment.shift))
        padded = tf.pad(image, [[pad_y, pad_y], [pad_x, pad_x], [0, 0]], mode="REFLECT")
        image = tf.image.stateless_random_crop(padded, tf.shape(image), shift)
    if augment.brightness > 0:
        image = tf.image.stateless_random_brightness(image, augment.brightness, light)
    if augment.contrast > 0:
        image = tf.image.stateless_random_contrast(image, 1 - augment.contrast, 1 + augment.contrast, contrast)
    return tf.clip_by_value(image, 0.0, 1.0)


def resolve_color_mode(images: Sequence[LabeledImage], model: ModelParams) -> ModelParams:
    """``color_mode: auto`` becomes grayscale when every image is single-channel, else rgb.

    Reads image headers only (Pillow opens lazily), so it costs a file open per image.
    """
    from PIL import Image

    if model.color_mode != "auto":
        return model
    for image in images:
        with Image.open(image.path) as opened:
            if opened.mode not in _SINGLE_CHANNEL_MODES:
                return replace(model, color_mode="rgb")
    return replace(model, color_mode="grayscale")


def decode_all(images: Sequence[LabeledImage], model: ImageInput) -> np.ndarray:
    """The images preprocessed for the model, in order, as one float32 array."""
    import numpy as np

    batches = make_dataset(images, model, batch_size=64, cache_max_mb=0).as_numpy_iterator()
    return np.concatenate([decoded for decoded, _ in batches])


def labels_of(images: Sequence[LabeledImage]) -> list[int]:
    return [image.label for image in images]


def defect_types_of(images: Sequence[LabeledImage]) -> list[str | None]:
    return [image.defect_type for image in images]
