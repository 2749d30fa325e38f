import numpy as np
import pytest

from tasks.data.near_duplicates import hash_matrix, nearest_train_images, within_radius


def clustered_hashes(rng: np.random.Generator, count: int) -> list[str]:
    """Hashes like one camera's: half the bits nearly constant, families of near-copies."""
    constant = rng.integers(0, 2, 256, dtype=np.uint8)
    fixed = rng.random(256) < 0.5
    bits = rng.integers(0, 2, (count, 256), dtype=np.uint8)
    bits[:, fixed] = constant[fixed]
    bits[:, fixed] ^= (rng.random((count, int(fixed.sum()))) < 0.02).astype(np.uint8)
    families = rng.integers(0, count, count // 3)
    for child, parent in zip(rng.choice(count, count // 3, replace=False), families, strict=True):
        bits[child] = bits[parent]
        flips = rng.choice(256, rng.integers(0, 13), replace=False)
        bits[child, flips] ^= 1
    return [np.packbits(row).tobytes().hex() for row in bits]


def brute_force(query: np.ndarray, base: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair compared: the answer the index must give."""
    distances = np.bitwise_count(query[:, None] ^ base[None, :]).sum(axis=2, dtype=np.int64)
    nearest = distances.argmin(axis=1)
    closest = distances.min(axis=1)
    close = closest <= radius
    return np.where(close, closest, -1), np.where(close, nearest, -1)


@pytest.fixture(scope="module")
def hashes() -> list[str]:
    return clustered_hashes(np.random.default_rng(7), 4000)


@pytest.mark.parametrize("radius", [0, 3, 8, 12])
def test_index_agrees_with_brute_force(hashes, radius):
    words = hash_matrix(hashes)
    query, base = words[:1000], words[1000:]
    expected = brute_force(query, base, radius)
    found = within_radius(query, base, radius)
    assert (found[0] == expected[0]).all() and (found[1] == expected[1]).all()
    assert (expected[0] >= 0).sum() >= 20  # the set holds near-duplicates at this radius


def test_empty_sides_find_nothing(hashes):
    words = hash_matrix(hashes[:5])
    for query, base in ((words, words[:0]), (words[:0], words)):
        distance, nearest = within_radius(query, base, 8)
        assert len(distance) == len(query) and (distance == -1).all() and (nearest == -1).all()


def split(hashes: list[str], start: int, stop: int, prefix: str) -> dict[str, str]:
    return {f"{prefix}{i:05d}": hashes[i] for i in range(start, stop)}


def test_warm_search_compares_only_new_files_and_matches_a_cold_one(hashes, tmp_path):
    cache = tmp_path / "leaks.json"
    train, held = split(hashes, 0, 3000, "t"), split(hashes, 3000, 3600, "h")
    cold = nearest_train_images(train, held, 8, cache)
    assert cold.compared_in_full == 600
    leaks = [p for p, d in zip(held, cold.distance, strict=True) if d is not None]
    assert len(leaks) > 20

    # One nearest train image removed, one held-out image changed, new files on both sides.
    train.pop(cold.nearest[list(held).index(leaks[0])])
    held[leaks[1]] = hashes[3700]
    train.update(split(hashes, 3800, 4000, "t"))
    held.update(split(hashes, 3600, 3650, "h"))
    warm = nearest_train_images(train, held, 8, cache)
    reference = nearest_train_images(train, held, 8)
    assert (warm.distance, warm.nearest) == (reference.distance, reference.nearest)
    assert warm.compared_in_full == 50 + 2 and warm.new_train == 200

    unchanged = nearest_train_images(train, held, 8, cache)
    assert (unchanged.compared_in_full, unchanged.new_train) == (0, 0)
    assert unchanged.nearest == reference.nearest


@pytest.mark.parametrize("damage", ["{not json", "[]", "null", '{"header": {"version": 1, "rad'])
def test_a_damaged_cache_is_ignored(hashes, tmp_path, damage):
    cache = tmp_path / "leaks.json"
    cache.write_text(damage)
    train, held = split(hashes, 0, 300, "t"), split(hashes, 300, 360, "h")
    found = nearest_train_images(train, held, 8, cache)
    reference = nearest_train_images(train, held, 8)
    assert found.compared_in_full == 60 and (found.distance, found.nearest) == (reference.distance, reference.nearest)


def test_ties_go_to_the_smallest_path(tmp_path):
    same = "ab" * 32
    found = nearest_train_images({"b.png": same, "a.png": same}, {"h.png": same}, 8)
    assert (found.distance, found.nearest) == ([0], ["a.png"])
