"""Find the labeled images of a data set, split them by content hash, feed them to Keras.

A data set is a folder with one subfolder per class (``data.classes`` in params). The
label of a class is its position in that list, never its place in alphabetical order.
An image's split is a function of the sha256 of its bytes and a salt, so adding images
never moves an old one between train, validation and test. Subfolders of the positive
class folder name defect types (``NG/crack/``); labels stay binary.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import IO, TYPE_CHECKING

from tasks.durable import atomic_write, sha256_of
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
# Under the project's cache folder (validate.cache_dir): decoded pixels of splits too large
# for train.cache_max_mb, one file per split. Bump the version when the file layout or
# decode_pixels changes, so no file written by older code is read.
PIXEL_CACHE_FOLDER = "train-cache"
PIXEL_CACHE_VERSION = 1


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
    mode: str | None = None  # Pillow's mode when the manifest recorded it; None: not looked at yet


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


def is_candidate_file(path: Path | os.DirEntry) -> bool:
    """Hidden files (.DS_Store, editor swap files) are never data."""
    return not path.name.startswith(".")


def walk_files(folder: str, prefix: str) -> Iterator[tuple[os.DirEntry, str]]:
    """Each entry below ``folder`` that training could list as a file, with its path in the
    data folder (``prefix``, then its path below ``folder``).

    Like ``Path.rglob`` in training: subfolders are searched, symlinked folders are not
    entered (they come out as entries, for the caller to judge), hidden files are skipped. A
    folder that is missing or vanishes during the walk holds nothing. Plain strings and
    ``os.scandir``: this runs once per image at every validation and ingest.
    """
    pending = [(folder, prefix)]
    while pending:
        directory, below = pending.pop()
        try:
            listing = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with listing:
            for entry in listing:
                relative = f"{below}/{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, relative))
                elif is_candidate_file(entry):
                    yield entry, relative


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
    """Every image of the data set with its label, hash and split, in a stable order: a scan of
    the folder, for tools that work on one without validate's manifest (the benchmarks). The
    stages read the manifest instead (tasks.data.image_manifest), which lists the same images
    in the same order.

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
    cache_dir: Path | str | None = None,
) -> tf.data.Dataset:
    """tf.data pipeline: parallel read and decode, cache decoded tensors, batch, prefetch.

    The cache keeps uint8 pixels at the input size (``decode_pixels``) in memory up to
    ``cache_max_mb`` (None: no limit; 0 for a single pass, no cache). Past it, with
    ``cache_dir``, the pixels are decoded once into a file there (``pixel_cache``) that
    every epoch, and the next run on the same images, reads; without ``cache_dir``, or
    when the file cannot be written, every epoch decodes the files again.

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
    decoded_mb = len(paths) * _pixel_bytes(model) / 1e6
    raw = False  # True: the elements are a pixel cache file's records, not yet unpacked
    if cache_max_mb is None or decoded_mb <= cache_max_mb:
        dataset = dataset.cache()
    elif cache_max_mb > 0:  # 0: a single pass, where a cache only costs memory
        log.info("%d images decode to %.0f MB, above train.cache_max_mb %.0f: not kept in memory",
                 len(paths), decoded_mb, cache_max_mb)
        cached = pixel_cache(images, model, cache_dir, dataset) if cache_dir is not None else None
        if cached is not None:
            dataset = _read_pixel_cache(cached, labels, model)
            raw = True
        else:
            log.info("%d images decoded again every epoch", len(paths))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(
            min(shuffle_buffer, max(len(paths), 1)), seed=shuffle_seed, reshuffle_each_iteration=True
        )
    shape = (*model.input_size, model.channels)
    if augment is not None and augment.active:
        seeds = tf.data.Dataset.random(seed=shuffle_seed or 0, rerandomize_each_iteration=True).batch(2)
        square = model.input_size[0] == model.input_size[1]
        dataset = tf.data.Dataset.zip((dataset, seeds)).map(
            lambda pair, seed: (
                augment_image(scale_pixels(_pixels_of(pair[0], raw, shape)), seed, augment, square), pair[1]
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    # Scaled (and a file's records unpacked) a batch at a time: one op per batch, not per image.
    return dataset.batch(batch_size).map(
        lambda pixels, label: (scale_pixels(_pixels_of(pixels, raw, (-1, *shape))), label),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    ).prefetch(tf.data.AUTOTUNE)


def _pixels_of(pixels: tf.Tensor, raw: bool, shape: tuple[int, ...]) -> tf.Tensor:
    """uint8 pixels in ``shape``: as they are, or unpacked from a pixel cache file's records."""
    import tensorflow as tf

    return tf.reshape(tf.io.decode_raw(pixels, tf.uint8), shape) if raw else pixels


def _pixel_bytes(model: ImageInput) -> int:
    """Bytes of one decoded image: uint8 at the input size."""
    return model.input_size[0] * model.input_size[1] * model.channels


def pixel_cache_file(images: Sequence[LabeledImage], model: ImageInput, cache_dir: Path | str) -> Path:
    """Where the decoded pixels of ``images`` are cached: named by their split and a key.

    The key covers, in order, each image's path, label, size, mtime and content hash, the
    input size, channels, TensorFlow's version (its resize makes the pixels) and
    PIXEL_CACHE_VERSION: a file is only ever read for exactly the images that made it.
    """
    import tensorflow as tf

    digest = hashlib.sha256(json.dumps(
        [PIXEL_CACHE_VERSION, tf.__version__, list(model.input_size), model.channels]
    ).encode())
    for image in images:
        info = image.path.stat()
        digest.update(f"{image.path}\0{image.label}\0{info.st_size}\0{info.st_mtime_ns}\0{image.sha256}\n".encode())
    return Path(cache_dir) / PIXEL_CACHE_FOLDER / f"{_splits_of(images)}-{digest.hexdigest()[:24]}.u8"


def _splits_of(images: Sequence[LabeledImage]) -> str:
    """The name of a pixel cache's purpose: its split, e.g. "train" (one file each)."""
    return "+".join(sorted({image.split for image in images}))


def pixel_cache(
    images: Sequence[LabeledImage], model: ImageInput, cache_dir: Path | str, decoded: tf.data.Dataset
) -> Path | None:
    """The file of the images' uint8 pixels, in order, written from ``decoded`` if missing.

    Written to a temp file and renamed, under a lock per split (two processes never write
    the same file; a killed writer's lock is released by the kernel), so a run killed at
    any point leaves no file that a later run reads. Other files of the same split (older
    data, a killed writer's temp file) are deleted first: the folder holds one per split.
    None, with a warning naming the folder and the fix, when the file cannot be written
    (disk full, no permission): training then decodes every epoch, slower but whole.
    """
    from filelock import FileLock

    folder = Path(cache_dir) / PIXEL_CACHE_FOLDER
    size = len(images) * _pixel_bytes(model)
    try:
        target = pixel_cache_file(images, model, cache_dir)
        split = _splits_of(images)
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(folder / f"{split}.lock"):
            if target.is_file() and target.stat().st_size == size:
                log.info("%s: decoded pixels of %d images, reused", target, len(images))
                return target
            for other in folder.iterdir():
                if other.name.lstrip(".").startswith(f"{split}-"):
                    other.unlink()
            free = shutil.disk_usage(folder).free
            if free < size:
                raise OSError(errno.ENOSPC, f"{size / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free")
            atomic_write(target, lambda handle: _write_pixels(handle, decoded))
    except OSError as exc:
        log.warning(
            "%s: cannot cache the decoded pixels of %d images there (%s); each epoch decodes them "
            "again (slower, same model). Free %.0f MB on that disk, or point validate.cache_dir "
            "at a folder that has it", folder, len(images), exc, size / 1e6,
        )
        return None
    log.info("%s: decoded pixels of %d images cached (%.0f MB)", target, len(images), size / 1e6)
    return target


def _write_pixels(handle: IO[bytes], decoded: tf.data.Dataset) -> None:
    for pixels in decoded.map(lambda pixel, _: pixel).batch(256).as_numpy_iterator():
        handle.write(pixels.tobytes())


def _read_pixel_cache(path: Path, labels: Sequence[float], model: ImageInput) -> tf.data.Dataset:
    """(record, label) pairs from a ``pixel_cache`` file: each record one image's uint8 pixels
    as bytes, unpacked by ``_pixels_of`` after the shuffle (a batch at a time)."""
    import tensorflow as tf

    records = tf.data.FixedLengthRecordDataset(str(path), _pixel_bytes(model), buffer_size=1 << 22)
    pairs = tf.data.Dataset.zip(records, tf.data.Dataset.from_tensor_slices(tf.constant(labels, tf.float32)))
    # A record file has no known length; Keras needs it to end each epoch as with the memory cache.
    return pairs.apply(tf.data.experimental.assert_cardinality(len(labels)))


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

    The modes come from the manifest; an image listed without one costs a header read.
    """
    from PIL import Image

    if model.color_mode != "auto":
        return model
    for image in images:
        mode = image.mode
        if mode is None:
            with Image.open(image.path) as opened:
                mode = opened.mode
        if mode not in _SINGLE_CHANNEL_MODES:
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
