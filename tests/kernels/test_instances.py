"""Instance masks (tinyunet.data.instances) against brute-force references.

Every check runs on both paths: the numba kernels and their numpy twins.
"""

from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyunet.data import instances
from tinyunet.errors import ShapeError

EXAMPLES = settings(max_examples=40)
sides = st.integers(1, 12)
seeds = st.integers(0, 2**32 - 1)
densities = st.floats(0.0, 1.0)


@pytest.fixture(params=["numpy", "numba"])
def path(request, monkeypatch):
    """Run the test on the numba kernels or on their numpy twins."""
    if request.param == "numba":
        if instances._kernels is None:
            pytest.skip("numba is not installed")
    else:
        monkeypatch.setattr(instances, "_kernels", None)
    return request.param


def random_mask(h, w, density, seed):
    return np.random.default_rng(seed).random((h, w)) < density


def random_ids(h, w, density, seed, cells=4):
    """Ids 0..cells drawn per pixel: objects of any shape, touching in every way."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cells + 1, (h, w))
    ids[rng.random((h, w)) >= density] = 0
    return ids


def squared_distances_brute(mask):
    """Squared distance of every pixel to every True pixel, minimised: O(P * Q)."""
    h, w = mask.shape
    targets = np.argwhere(mask)
    if not len(targets):
        return np.full((h, w), np.inf)
    grid = np.indices((h, w)).reshape(2, -1).T
    squared = ((grid[:, None, :] - targets[None, :, :]) ** 2).sum(axis=-1)
    return squared.min(axis=1).reshape(h, w).astype(np.float64)


def two_nearest_brute(ids, max_distance):
    h, w = ids.shape
    per_cell = [squared_distances_brute(ids == k) for k in np.unique(ids[ids > 0])]
    per_cell += [np.full((h, w), np.inf)] * 2
    squared = np.sort(np.stack(per_cell), axis=0)
    squared[squared > max_distance**2] = np.inf
    return np.sqrt(squared[0]), np.sqrt(squared[1])


def touching_brute(ids):
    h, w = ids.shape
    out = np.zeros((h, w), bool)
    for r in range(h):
        for c in range(w):
            for rr in range(max(r - 1, 0), min(r + 2, h)):
                for cc in range(max(c - 1, 0), min(c + 2, w)):
                    if ids[r, c] > 0 and ids[rr, cc] > 0 and ids[rr, cc] != ids[r, c]:
                        out[r, c] = True
    return out


def weight_map_brute(ids, w0, sigma, class_balance):
    foreground = ids > 0
    weights = np.ones(ids.shape)
    if class_balance and 0 < foreground.sum() < ids.size:
        for cls in (foreground, ~foreground):
            weights[cls] = 1.0 / (2 * cls.mean())
    d1, d2 = two_nearest_brute(ids, np.inf)
    term = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
    where = ~foreground | touching_brute(ids)
    weights[where] += term[where]
    return weights


def neighbours(r, c, h, w, diagonal):
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if (dr, dc) == (0, 0) or (not diagonal and dr and dc):
                continue
            if 0 <= r + dr < h and 0 <= c + dc < w:
                yield r + dr, c + dc


def flood_fill_components(mask, diagonal):
    """Components by one flood fill per unlabelled pixel, scanned in raster order."""
    h, w = mask.shape
    out = np.zeros((h, w), np.int64)
    count = 0
    for r in range(h):
        for c in range(w):
            if mask[r, c] and not out[r, c]:
                count += 1
                out[r, c] = count
                todo = deque([(r, c)])
                while todo:
                    pr, pc = todo.popleft()
                    for q in neighbours(pr, pc, h, w, diagonal):
                        if mask[q] and not out[q]:
                            out[q] = count
                            todo.append(q)
    return out, count


def raster_numbered(ids):
    """Ids renumbered 1..N in raster order of each object's first pixel."""
    out = np.zeros_like(ids)
    for new, old in enumerate(dict.fromkeys(ids[ids > 0].tolist()), start=1):
        out[ids == old] = new
    return out


def instances_from_labels_brute(labels, min_size):
    """Each foreground pixel takes the seed at the smallest geodesic (8-connected)
    distance, ties to the seed with the smaller number; one BFS per seed."""
    h, w = labels.shape
    foreground = labels > 0
    seeds, count = flood_fill_components(labels == 1, diagonal=False)
    best = np.full((h, w), np.inf)
    ids = np.zeros((h, w), np.int64)
    for seed in range(1, count + 1):
        distance = np.full((h, w), np.inf)
        distance[seeds == seed] = 0
        todo = deque(map(tuple, np.argwhere(seeds == seed)))
        while todo:
            p = todo.popleft()
            for q in neighbours(*p, h, w, diagonal=True):
                if foreground[q] and distance[q] == np.inf:
                    distance[q] = distance[p] + 1
                    todo.append(q)
        closer = distance < best  # equal distance keeps the smaller seed number
        ids[closer], best[closer] = seed, distance[closer]
    leftover, _ = flood_fill_components(foreground & (ids == 0), diagonal=True)
    ids[leftover > 0] = leftover[leftover > 0] + count
    for k in np.unique(ids[ids > 0]):
        if np.count_nonzero(ids == k) < min_size:
            ids[ids == k] = 0
    return raster_numbered(ids)


# ----------------------------------------------------------------------------------


def test_distance_to_matches_brute_force(path):
    @EXAMPLES
    @given(h=sides, w=sides, density=densities, seed=seeds)
    def check(h, w, density, seed):
        mask = random_mask(h, w, density, seed)
        got = instances.distance_to(mask)
        assert got.dtype == np.float32 and got.shape == (h, w)
        np.testing.assert_allclose(got, np.sqrt(squared_distances_brute(mask)), rtol=1e-6)

    check()


def test_distance_to_without_true_pixel_is_inf(path):
    assert np.all(np.isinf(instances.distance_to(np.zeros((3, 5), bool))))
    one = np.zeros((3, 5), bool)
    one[2, 4] = True
    np.testing.assert_allclose(instances.distance_to(one)[0, 0], np.hypot(2, 4), rtol=1e-6)


def test_two_nearest_distances_match_brute_force(path):
    @EXAMPLES
    @given(h=sides, w=sides, density=densities, seed=seeds,
           max_distance=st.sampled_from([0.0, 1.0, 1.5, 2.0, 3.7, 1e9]))
    def check(h, w, density, seed, max_distance):
        ids = random_ids(h, w, density, seed)
        d1, d2 = instances.two_nearest_distances(ids, max_distance)
        e1, e2 = two_nearest_brute(ids, max_distance)
        assert d1.dtype == d2.dtype == np.float32
        np.testing.assert_allclose(d1, e1, rtol=1e-6)
        np.testing.assert_allclose(d2, e2, rtol=1e-6)

    check()


def test_weight_map_matches_brute_force(path):
    @EXAMPLES
    @given(h=sides, w=sides, density=densities, seed=seeds,
           w0=st.sampled_from([0.0, 1.0, 10.0]), sigma=st.sampled_from([0.7, 2.0, 5.0]),
           class_balance=st.booleans())
    def check(h, w, density, seed, w0, sigma, class_balance):
        ids = random_ids(h, w, density, seed)
        got = instances.weight_map(ids, w0=w0, sigma=sigma, class_balance=class_balance,
                                   max_distance=np.inf)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, weight_map_brute(ids, w0, sigma, class_balance),
                                   rtol=1e-5)

    check()


def test_weight_map_default_cutoff_stays_within_tolerance(path):
    yy, xx = np.mgrid[:70, :90]
    ids = np.zeros((70, 90), np.int32)
    for k, (cy, cx, r) in enumerate([(15, 15, 8), (15, 33, 10), (50, 70, 12), (55, 20, 6)]):
        ids[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k + 1
    exact = instances.weight_map(ids, max_distance=np.inf)
    cut = instances.weight_map(ids)
    assert instances.weight_map_cutoff(10.0, 5.0) == pytest.approx(21.46, abs=0.01)
    assert np.abs(exact - cut).max() <= instances.WEIGHT_TOLERANCE
    assert np.abs(exact - cut).max() > 0  # the cut-off does drop something here


def test_weight_map_class_balance_averages_one_and_weights_gaps(path):
    ids = np.zeros((6, 10), np.int32)
    ids[1:5, 1:4] = 1
    ids[1:5, 5:8] = 2  # a one-pixel background gap at column 4
    balanced = instances.weight_map(ids, w0=0.0)
    assert balanced.mean() == pytest.approx(1.0, rel=1e-6)
    assert balanced[ids > 0].sum() == pytest.approx(balanced[ids == 0].sum(), rel=1e-6)
    weights = instances.weight_map(ids, w0=10.0, sigma=5.0)
    # The gap pixel between the cells: d1 = d2 = 1.
    assert weights[2, 4] == pytest.approx(balanced[2, 4] + 10 * np.exp(-4 / 50), rel=1e-6)
    # Inside a cell: w_c only.
    assert weights[2, 2] == pytest.approx(balanced[2, 2], rel=1e-6)
    assert np.all(instances.weight_map(np.zeros((3, 4), np.int32)) == 1.0)
    assert np.all(instances.weight_map(np.ones((3, 4), np.int32), w0=0.0) == 1.0)


def test_instance_targets_mark_borders_where_cells_touch():
    ids = np.zeros((8, 12), np.int32)
    ids[2:6, 2:6] = 1
    ids[2:6, 6:10] = 2  # touches 1 along a column
    ids[6:8, 10:12] = 3  # touches 2 at one corner only
    expected = (ids > 0).astype(np.uint8)
    expected[2:6, 5:7] = 2  # both sides of the contact between 1 and 2
    expected[5, 9] = 2  # the corner contact between 2 and 3
    expected[6, 10] = 2
    got = instances.instance_targets(ids)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


def test_instance_targets_on_random_masks():
    @EXAMPLES
    @given(h=sides, w=sides, density=densities, seed=seeds)
    def check(h, w, density, seed):
        ids = random_ids(h, w, density, seed)
        labels = instances.instance_targets(ids)
        np.testing.assert_array_equal(labels > 0, ids > 0)
        np.testing.assert_array_equal(labels == 2, touching_brute(ids))

    check()


@pytest.mark.parametrize("connectivity", [1, 2])
def test_label_components_match_flood_fill(path, connectivity):
    @EXAMPLES
    @given(h=sides, w=sides, density=densities, seed=seeds)
    def check(h, w, density, seed):
        mask = random_mask(h, w, density, seed)
        ids, count = instances.label_components(mask, connectivity)
        expected, expected_count = flood_fill_components(mask, diagonal=connectivity == 2)
        assert ids.dtype == np.int32 and count == expected_count
        np.testing.assert_array_equal(ids, expected)

    check()


def test_instances_from_labels_split_touching_cells(path):
    ids = np.zeros((8, 12), np.int32)
    ids[2:6, 2:6] = 1
    ids[2:6, 6:10] = 2
    got = instances.instances_from_labels(instances.instance_targets(ids))
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, ids)


def test_instances_from_labels_seedless_blob_and_min_size(path):
    labels = np.zeros((6, 9), np.uint8)
    labels[1:5, 1:4] = 1  # a cell with an interior
    labels[1:3, 6:8] = 2  # a blob of border pixels only, apart from it
    got = instances.instances_from_labels(labels)
    expected = np.zeros((6, 9), np.uint16)
    expected[1:5, 1:4] = 1
    expected[1:3, 6:8] = 2
    np.testing.assert_array_equal(got, expected)
    expected[1:3, 6:8] = 0
    np.testing.assert_array_equal(instances.instances_from_labels(labels, min_size=5), expected)


def test_instances_from_labels_ties_go_to_the_first_seed(path):
    labels = np.array([[1, 2, 2, 2, 1]])
    np.testing.assert_array_equal(instances.instances_from_labels(labels), [[1, 1, 1, 2, 2]])


def test_instances_from_labels_match_brute_force(path):
    @EXAMPLES
    @given(h=sides, w=sides, density=densities, seed=seeds, min_size=st.integers(0, 3))
    def check(h, w, density, seed, min_size):
        rng = np.random.default_rng(seed)
        labels = rng.integers(1, 3, (h, w))
        labels[rng.random((h, w)) >= density] = 0
        got = instances.instances_from_labels(labels, min_size=min_size)
        np.testing.assert_array_equal(got, instances_from_labels_brute(labels, min_size))

    check()


def test_instances_from_foreground(path):
    fg = np.zeros((5, 7), bool)
    fg[0, 0] = fg[1, 1] = True  # corner contact: one object
    fg[3:5, 4:7] = True
    fg[0, 6] = True
    got = instances.instances_from_foreground(fg)
    expected = np.zeros((5, 7), np.uint16)
    expected[0, 0] = expected[1, 1] = 1
    expected[0, 6] = 2
    expected[3:5, 4:7] = 3
    np.testing.assert_array_equal(got, expected)
    large = np.zeros((5, 7), np.uint16)
    large[3:5, 4:7] = 1
    np.testing.assert_array_equal(instances.instances_from_foreground(fg, min_size=3), large)


def test_instances_beyond_65535_are_uint32(path):
    fg = np.zeros((512, 512), bool)
    fg[::2, ::2] = True  # 65536 single pixels, none touching
    ids = instances.instances_from_foreground(fg)
    assert ids.dtype == np.uint32 and ids.max() == 65536
    assert instances.instances_from_foreground(fg[:510]).dtype == np.uint16


def test_paths_agree_on_a_crowded_image(monkeypatch):
    if instances._kernels is None:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:120, :140]
    ids = np.zeros((120, 140), np.int32)
    for k in range(40):  # overlapping discs, the later on top: touching cells
        cy, cx, r = rng.uniform(0, 120), rng.uniform(0, 140), rng.uniform(5, 12)
        ids[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k + 1
    results = []
    for kernels in (instances._kernels, None):
        monkeypatch.setattr(instances, "_kernels", kernels)
        labels = instances.instance_targets(ids)
        results.append((instances.weight_map(ids), instances.instances_from_labels(labels),
                        instances.label_components(ids > 0, 2)[0]))
    for fast, plain in zip(*results, strict=True):
        np.testing.assert_array_equal(fast, plain)


@pytest.mark.parametrize("call, message", [
    (lambda: instances.distance_to(np.zeros((2, 3, 4))), "distance_to: Expect: a mask"),
    (lambda: instances.weight_map(np.zeros((3, 3))), "weight_map: Expect: integer"),
    (lambda: instances.weight_map(np.ones((3, 3), int), sigma=0), "sigma > 0"),
    (lambda: instances.instance_targets(-np.ones((3, 3), int)), "ids >= 0"),
    (lambda: instances.label_components(np.ones((3, 3)), 3), "connectivity 1"),
    (lambda: instances.instances_from_labels(np.full((3, 3), 3)), "Actual: values 3..3"),
    (lambda: instances.instances_from_labels(np.ones((3, 3))), "Actual: dtype float64"),
    (lambda: instances.instances_from_foreground(np.ones((3, 3)), -1), "min_size >= 0"),
])
def test_bad_input_names_the_op(call, message):
    with pytest.raises(ShapeError, match=message):
        call()
