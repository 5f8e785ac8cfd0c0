"""lib/instances.py: seeds + watershed split touching buildings, the same whatever the blocks of a scene."""

from itertools import pairwise

import cv2
import numpy as np
import pytest
import shapely

from lib import footprints
from lib.instances import InstancePolygonizer, instance_pieces, label_instances

SETTINGS = {"seed_threshold": 0.5, "seed_min_px": 2}


def _maps(ids: np.ndarray, seed: int = 0):
    """uint8 prob/border/contact maps of an id raster, as a model would predict them (noisy, not exact)."""
    rng = np.random.default_rng(seed)
    f = ids.astype(np.float32)
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    near_max = cv2.dilate(f, cross)
    near_min = cv2.erode(np.where(ids > 0, f, 1e9).astype(np.float32), np.ones((3, 3), np.uint8))
    border = (ids > 0) & ((near_max != f) | (cv2.erode(f, cross) != f))
    contact = (ids == 0) & (cv2.dilate(f, np.ones((3, 3), np.uint8)) > near_min)
    noise = rng.integers(0, 50, ids.shape)
    prob = np.where(ids > 0, 255 - noise, noise)
    return (prob.astype(np.uint8), np.where(border, 230, noise).astype(np.uint8),
            np.where(contact, 230, noise).astype(np.uint8))


def _town(seed: int = 0, shape=(150, 210)) -> np.ndarray:
    """Rows of terraced houses (touching, some with 1 px gaps), L-shaped and tall ones across many rows."""
    rng = np.random.default_rng(seed)
    ids = np.zeros(shape, np.int32)
    k, r = 0, 2
    while r < shape[0] - 8:
        h, c = int(rng.integers(5, 13)), int(rng.integers(0, 5))
        while c < shape[1] - 3:
            w = int(rng.integers(4, 14))
            k += 1
            ids[r:r + h, c:c + w] = k
            if rng.random() < 0.2:  # an L: a wing below, touching the next row of houses
                ids[r + h:r + h + 2, c:c + 3] = k
            c += w + (int(rng.integers(1, 4)) if rng.random() < 0.3 else 0)
        r += h + int(rng.integers(0, 3))
    ids[4:140, 150:156] = k + 1  # one building down most of the scene, touching houses on both sides
    ids[0:6, shape[1] - 9:] = k + 2  # and one on the scene's corner
    return ids


def _key(pieces) -> list:
    """Pieces as comparable values: exact outline (vertex order and start aside), pixels, probability sum."""
    return sorted((shapely.normalize(shapely.simplify(p.geom, 0)).wkt, p.pixels, p.prob_sum) for p in pieces)


def _stream(mask, maps, rows, cols, maps_given: bool = True):
    """Footprints from InstancePolygonizer fed in bands `rows` (edges) x column blocks `cols` (edges)."""
    prob, border, contact = maps
    poly = InstancePolygonizer(*mask.shape, **SETTINGS)
    for r0, r1 in pairwise(rows):
        for c0, c1 in pairwise(cols):
            extra = (border[r0:r1, c0:c1], contact[r0:r1, c0:c1]) if maps_given else ()
            poly.add(r0, mask[r0:r1, c0:c1], prob[r0:r1, c0:c1], c0, *extra)
    return poly.finish()


def _edges(size: int, step: int) -> list[int]:
    return [*range(0, size, step), size]


def test_touching_rectangles_with_a_contact_line_are_two_buildings_and_one_without_the_maps():
    prob = np.zeros((40, 60), np.float32)
    prob[10:30, 10:50] = 0.9  # two 20 x 20 roofs side by side: one blob
    border = np.zeros_like(prob)
    contact = np.zeros_like(prob)
    contact[10:30, 29:31] = 1.0  # where they meet
    labels = label_instances(prob, border, contact, threshold=0.5, **SETTINGS)
    assert sorted(np.bincount(labels.ravel())[1:].tolist()) == [400, 400]
    assert set(np.unique(labels[10:30, 10:30])) == {labels[15, 15]} != {labels[15, 40]}
    plain = label_instances(prob, None, None, threshold=0.5, **SETTINGS)
    assert np.bincount(plain.ravel()).tolist() == [40 * 60 - 800, 800]


def test_seeds_smaller_than_seed_min_px_are_dropped():
    prob = np.zeros((20, 40), np.float32)
    prob[5:15, 5:35] = 0.9
    contact = np.zeros_like(prob)
    contact[5:15, 20:22] = 1.0
    contact[5:15, 24:35] = 1.0  # seeds: columns 5..19 (150 px) and 22..23 (20 px)
    both = label_instances(prob, None, contact, threshold=0.5, seed_threshold=0.5, seed_min_px=20)
    one = label_instances(prob, None, contact, threshold=0.5, seed_threshold=0.5, seed_min_px=21)
    assert sorted(np.bincount(both.ravel())[1:].tolist()) == [140, 160]  # each takes one column of 20..21
    assert np.bincount(one.ravel())[1:].tolist() == [300]  # the small seed gone: one building


def test_uint8_and_float_maps_give_the_same_labels():
    maps = _maps(_town(1, (80, 120)))
    as_u8 = label_instances(*maps, threshold=0.5, **SETTINGS)
    as_float = label_instances(*(m / 255.0 for m in maps), threshold=0.5, **SETTINGS)
    assert np.array_equal(as_u8, as_float) and as_u8.dtype == np.int32 and as_u8.max() > 20


def test_touching_houses_are_separated_into_about_the_true_buildings():
    ids = _town(0)
    labels = label_instances(*_maps(ids), threshold=0.5, **SETTINGS)
    blobs = cv2.connectedComponents((ids > 0).astype(np.uint8), connectivity=4)[0] - 1
    true = len(np.unique(ids)) - 1
    assert blobs < true / 3 and abs(int(labels.max()) - true) <= true * 0.05
    assert np.array_equal(labels > 0, ids > 0)


def _one_watershed(prob, border, contact, *, threshold, seed_threshold, seed_min_px):
    """Seeds + one skimage watershed over the whole array: what label_instances computes blob by blob."""
    from skimage.segmentation import watershed

    mask = prob >= threshold * 255
    score = prob / 255.0 * (1 - border / 255.0) * (1 - contact / 255.0)
    _, seeds, stats, _ = cv2.connectedComponentsWithStats(((score >= seed_threshold) & mask).astype(np.uint8),
                                                          connectivity=4)
    keep = stats[:, cv2.CC_STAT_AREA] >= seed_min_px
    keep[0] = False
    markers = watershed(1 - score, np.where(keep, np.cumsum(keep), 0)[seeds], mask=mask, connectivity=1)
    rest = cv2.connectedComponents((mask & (markers == 0)).astype(np.uint8), connectivity=4)[1]
    return np.where(rest > 0, rest + keep.sum(), markers)


def test_labels_match_one_watershed_over_the_array_up_to_its_ties_and_a_blob_ignores_its_neighbours():
    ids = _town(2)
    maps = _maps(ids, seed=2)
    labels = label_instances(*maps, threshold=0.5, **SETTINGS)
    reference = _one_watershed(*maps, threshold=0.5, **SETTINGS)
    assert labels.max() == reference.max() > 200
    assert np.mean(labels[ids > 0] == reference[ids > 0]) > 0.999  # only equal-value ties may go another way
    # a blob alone in an empty array gets exactly the labels it gets among the others
    blob = cv2.connectedComponents((maps[0] >= 128).astype(np.uint8), connectivity=4)[1] == 1
    alone = label_instances(*(np.where(blob, m, 0).astype(np.uint8) for m in maps), threshold=0.5, **SETTINGS)
    inside = labels[blob]
    assert len(np.unique(inside)) > 3 and np.array_equal(np.unique(inside, return_inverse=True)[1],
                                                         np.unique(alone[blob], return_inverse=True)[1])


@pytest.mark.parametrize("rows, cols", [
    (_edges(150, 17), _edges(210, 23)),  # seams through many houses
    (_edges(150, 1), [0, 210]),  # blocks of one row
    (_edges(150, 40), [0, 5, 6, 50, 51, 120, 151, 152, 210]),  # irregular column blocks, 1 px wide ones
    ([0, 1, 33, 34, 90, 150], _edges(210, 64)),  # irregular bands
    ([0, 150], [0, 210]),  # the whole scene as one block
], ids=["grid", "rows", "columns", "bands", "whole"])
def test_streamed_instances_equal_the_instances_of_the_whole_scene(rows, cols):
    ids = _town(0)
    maps = _maps(ids)
    labels = label_instances(*maps, threshold=0.5, **SETTINGS)
    whole = instance_pieces(labels, maps[0])
    streamed = _stream(maps[0] >= 128, maps, rows, cols)
    assert len(streamed) == len(whole) == labels.max() > 200
    assert _key(streamed) == _key(whole)
    assert sum(p.pixels for p in streamed) == (ids > 0).sum()  # each building once: a partition of the mask


def test_a_building_across_three_bands_is_joined_then_split_where_its_maps_say():
    ids = np.zeros((90, 50), np.int32)
    ids[5:85, 20:30] = 1
    ids[45:85, 20:30] = 2  # two buildings one above the other, touching at row 45
    ids[40:44, 10:20] = 3  # a neighbour touching the first from the left
    maps = _maps(ids, seed=4)
    streamed = _stream(maps[0] >= 128, maps, [0, 30, 60, 90], [0, 25, 50])
    whole = instance_pieces(label_instances(*maps, threshold=0.5, **SETTINGS), maps[0])
    assert _key(streamed) == _key(whole)
    pixels = sorted(p.pixels for p in streamed)  # noisy maps: a corner pixel may go to the neighbour
    assert sum(pixels) == 840 and np.abs(np.subtract(pixels, [40, 400, 400])).max() <= 2
    tops = sorted(shapely.bounds(p.geom)[1] for p in streamed)
    assert tops == [5, 40, 45]  # the tall one split at row 45, where the two meet


def test_without_border_and_contact_maps_the_footprints_are_the_polygonizers():
    ids = _town(2, (100, 140))
    prob = _maps(ids)[0]
    mask = prob >= 128
    rows, cols = _edges(100, 13), [0, 30, 31, 90, 140]
    poly = footprints.Polygonizer(*mask.shape)
    for r0, r1 in pairwise(rows):
        for c0, c1 in pairwise(cols):
            poly.add(r0, mask[r0:r1, c0:c1], prob[r0:r1, c0:c1], c0)
    plain = poly.finish()
    instances = _stream(mask, (prob, None, None), rows, cols, maps_given=False)
    assert _key(instances) == _key(plain) and len(plain) > 10


def test_a_building_on_the_scene_border_is_finished_with_its_block_and_only_seam_blobs_wait():
    ids = np.zeros((60, 80), np.int32)
    ids[0:10, 70:80] = 1  # the scene's corner, inside the top-right block
    ids[25:35, 10:20] = 2  # across the seam at row 30
    maps = _maps(ids, seed=5)
    mask = maps[0] >= 128
    sink = []
    poly = InstancePolygonizer(60, 80, sink=type("Sink", (), {"add": lambda self, p: sink.extend(p)})(),
                               **SETTINGS)
    poly.add(0, mask[:30, :40], maps[0][:30, :40], 0, maps[1][:30, :40], maps[2][:30, :40])
    poly.add(0, mask[:30, 40:], maps[0][:30, 40:], 40, maps[1][:30, 40:], maps[2][:30, 40:])
    assert [p.pixels for p in sink] == [100] and shapely.bounds(sink[0].geom).tolist() == [70, 0, 80, 10]
    assert len(poly.open) == 1  # only the blob on the seam
    poly.add(30, mask[30:], maps[0][30:], 0, maps[1][30:], maps[2][30:])
    assert poly.finish() == [] and [p.pixels for p in sink] == [100, 100] and poly.open == []


def test_blocks_out_of_row_order_or_with_different_maps_are_refused():
    poly = InstancePolygonizer(100, 100, **SETTINGS)
    ones = np.ones((50, 100), bool)
    poly.add(50, ones, np.full((50, 100), 200, np.uint8))
    with pytest.raises(ValueError, match="row order"):
        poly.add(0, ones)
    with pytest.raises(ValueError, match="same maps"):
        poly.add(50, ones, None, 0, np.zeros((50, 100), np.uint8))


def test_a_label_in_two_parts_keeps_its_largest_polygon_and_all_its_pixels():
    labels = np.zeros((10, 20), np.int32)
    labels[1:4, 1:4] = 1
    labels[6:8, 10:12] = 1
    (piece,) = instance_pieces(labels, np.full(labels.shape, 100, np.uint8), row_off=5, col_off=7)
    assert piece.pixels == 13 and piece.prob_sum == 1300.0
    assert shapely.bounds(piece.geom).tolist() == [8, 6, 11, 9]
