"""Near-duplicate search over 256-bit difference hashes, without comparing all pairs.

Comparing every validation/test image with every train image costs n_held x n_train
popcounts: at 100,000 images that is about two billion comparisons a night. Multi-index
hashing answers "which train hashes lie within r bits" exactly: cut the 256 bits into
r + 1 disjoint chunks; two hashes at most r bits apart differ in at most r chunks, so
they agree exactly on at least one (pigeonhole). Only pairs that share a chunk value
are compared in full. With 4 chunks that guarantee holds for r <= 3 only, hence r + 1.

The chunks take bit positions in a fixed shuffled order, not thumbnail rows: one camera
makes the border rows of every image nearly alike, and a chunk made of them would put
every image in one bucket (all pairs compared again).

``nearest_train_images`` adds a cache so a warm validation compares only new files: a
held-out image keeps its earlier answer unless its nearest train image is gone, and is
compared with the train images added since.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.durable import read_json, write_json

log = logging.getLogger(__name__)

HASH_BITS = 256
_CACHE_VERSION = 1
_MAX_PAIRS = 2_000_000  # candidate pairs checked at once: bounds memory on clustered hashes
_BIT_ORDER = np.random.default_rng(20261202).permutation(HASH_BITS)


def hash_matrix(hashes: list[str]) -> np.ndarray:
    """One row of four 64-bit words per hex hash, so XOR and popcount run word by word."""
    words = np.frombuffer(bytes.fromhex("".join(hashes)), dtype=np.uint64)
    return words.reshape(len(hashes), HASH_BITS // 64)


def _chunk_keys(words: np.ndarray, chunks: int) -> list[np.ndarray]:
    """For each chunk, one integer per hash made of that chunk's (shuffled) bits."""
    bits = np.unpackbits(words.view(np.uint8), axis=1)[:, _BIT_ORDER]
    keys = []
    for positions in np.array_split(np.arange(HASH_BITS), chunks):
        weights = np.left_shift(np.uint64(1), np.arange(len(positions), dtype=np.uint64))
        keys.append((bits[:, positions].astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64))
    return keys


def within_radius(query: np.ndarray, base: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """For each query hash, the closest base hash at most ``radius`` bits away.

    Returns (distance, index): -1 in both where no base hash is that close. Ties go to the
    lowest base index, as a scan in base order would. Exact: the same answer as comparing
    every pair, for any data; only the time depends on how the hashes cluster.
    """
    distance = np.full(len(query), -1, dtype=np.int64)
    nearest = np.full(len(query), -1, dtype=np.int64)
    if radius < 0 or not len(query) or not len(base):
        return distance, nearest
    chunks = min(radius + 1, HASH_BITS)
    found_q, found_b, found_d = [], [], []
    for query_key, base_key in zip(_chunk_keys(query, chunks), _chunk_keys(base, chunks), strict=True):
        order = np.argsort(base_key, kind="stable")
        sorted_key = base_key[order]
        low = np.searchsorted(sorted_key, query_key, "left")
        counts = np.searchsorted(sorted_key, query_key, "right") - low
        for rows in _slices_of_pairs(counts):
            q = np.repeat(rows, counts[rows])
            starts = np.repeat(low[rows], counts[rows])
            offsets = np.arange(len(q)) - np.repeat(np.cumsum(counts[rows]) - counts[rows], counts[rows])
            b = order[starts + offsets]
            d = np.bitwise_count(query[q] ^ base[b]).sum(axis=1, dtype=np.int64)
            close = d <= radius
            found_q.append(q[close])
            found_b.append(b[close])
            found_d.append(d[close])
    if not found_q:
        return distance, nearest
    q, b, d = (np.concatenate(found) for found in (found_q, found_b, found_d))
    best = np.lexsort((b, d, q))
    first = best[np.unique(q[best], return_index=True)[1]]
    distance[q[first]] = d[first]
    nearest[q[first]] = b[first]
    return distance, nearest


def _slices_of_pairs(counts: np.ndarray) -> list[np.ndarray]:
    """Query rows in groups of at most ``_MAX_PAIRS`` candidate pairs (one row may exceed it)."""
    rows = np.flatnonzero(counts)
    if not len(rows):
        return []
    group = np.cumsum(counts[rows]) // _MAX_PAIRS
    return np.split(rows, np.flatnonzero(np.diff(group)) + 1)


@dataclass(frozen=True)
class LeakSearch:
    """Per held-out image: bits to its nearest train image and that image (None: none close)."""

    distance: list[int | None]
    nearest: list[str | None]
    compared_in_full: int  # held-out images compared with every train image
    new_train: int  # train images the cached held-out images were compared with


def nearest_train_images(
    train: dict[str, str], held_out: dict[str, str], radius: int, cache_path: Path | None = None,
) -> LeakSearch:
    """The closest train image within ``radius`` bits of each held-out image (path -> dHash).

    Paths break ties (the smallest wins), so the answer does not depend on which run
    found it. With ``cache_path``, a held-out image whose dHash, and nearest train image,
    are unchanged since the cached run is compared only with the train images added since.
    """
    before_train, before_held = _load(cache_path, radius)
    train_paths = sorted(train)
    new_train = [p for p in train_paths if before_train.get(p) != train[p]]
    gone = {p for p, h in before_train.items() if train.get(p) != h}
    held_paths = list(held_out)
    answers: dict[str, tuple[int | None, str | None]] = {}
    full, partial = [], []
    for path in held_paths:
        hit = before_held.get(path)
        if hit is None or hit[0] != held_out[path] or hit[2] in gone:
            full.append(path)
        else:
            partial.append(path)
            answers[path] = (hit[1], hit[2])
    _search({p: held_out[p] for p in full}, {p: train[p] for p in train_paths}, radius, answers)
    _search({p: held_out[p] for p in partial}, {p: train[p] for p in new_train}, radius, answers)
    distance = [answers[p][0] for p in held_paths]
    nearest = [answers[p][1] for p in held_paths]
    if cache_path is not None and (full or new_train or gone or len(before_held) != len(held_paths)):
        _save(cache_path, radius, train, {p: [held_out[p], *answers[p]] for p in held_paths})
    log.info("near-duplicate search: %d held-out image(s) against %d train, %d cached "
             "against %d new train", len(full), len(train_paths), len(partial), len(new_train))
    return LeakSearch(distance, nearest, len(full), len(new_train) if partial else 0)


def _search(
    queries: dict[str, str], base: dict[str, str], radius: int,
    answers: dict[str, tuple[int | None, str | None]],
) -> None:
    """Keep, per query, the better of its current answer and the closest ``base`` image
    (path -> dHash, in path order)."""
    if not queries:
        return
    base_paths = list(base)
    distance, index = within_radius(
        hash_matrix(list(queries.values())), hash_matrix(list(base.values())), radius,
    )
    for path, bits, where in zip(queries, distance.tolist(), index.tolist(), strict=True):
        found = (bits, base_paths[where]) if where >= 0 else (None, None)
        current = answers.get(path, (None, None))
        if current[0] is None or (found[0] is not None and found < current):
            answers[path] = found


def _load(path: Path | None, radius: int) -> tuple[dict[str, str], dict[str, list]]:
    """Train hashes and held-out answers of the last run, or nothing if unusable."""
    stored = read_json(path) if path is not None else {}
    if stored.get("header") != {"version": _CACHE_VERSION, "radius": radius}:
        return {}, {}
    return stored.get("train", {}), stored.get("held_out", {})


def _save(path: Path, radius: int, train: dict[str, str], held: dict[str, list]) -> None:
    write_json(path, {
        "header": {"version": _CACHE_VERSION, "radius": radius}, "train": train, "held_out": held,
    }, indent=None)
