"""Building instances from the building, border and contact maps: seeds + watershed, streamed by blocks.

Touching roofs form one connected blob in the building mask. The instance head predicts where a
building's own border runs and where two buildings meet (contact), so their inner parts -- the seeds,
where building x (1 - border) x (1 - contact) is high -- are apart; each seed then grows back over its
blob by watershed (the SpaceNet-4 winners' recipe). `label_instances` does it for a whole array;
`InstancePolygonizer` does the same for a scene handed over in blocks, as `lib.footprints.Polygonizer`
does for plain components, and gives the same instances whatever the blocks: a blob is only labelled
once every block it reaches has arrived, on a crop of that blob alone, and labelling a blob never looks
outside it (`_instances`).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import shapely
from affine import Affine
from rasterio.features import shapes

from lib.footprints import Piece, Polygonizer, polygon_of


def label_instances(prob, border, contact, *, threshold: float, seed_threshold: float,
                    seed_min_px: int) -> np.ndarray:
    """int32 labels [H, W] (0 = background) of the buildings in the maps (float 0..1 or uint8 0..255).

    Mask = prob >= threshold; each 4-connected blob of it is split among its seeds (4-connected parts of
    score >= seed_threshold with at least `seed_min_px` pixels) by watershed on 1 - score; a blob without
    a seed is one building. With `border` and `contact` both None every blob is one building.
    """
    mask = _unit(prob) >= threshold
    return _instances(mask, prob, border, contact, seed_threshold, seed_min_px)


def instance_pieces(labels: np.ndarray, prob_u8: np.ndarray | None, row_off: int = 0,
                    col_off: int = 0) -> list[Piece]:
    """One `Piece` per label (pixel coordinates moved by the offsets; pixel count; sum of `prob_u8`).

    Labels from `label_instances` are 4-connected, so each is one polygon. A label in several parts
    (other label arrays) keeps its largest polygon but counts all its pixels: a footprint is one polygon.
    """
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    n = int(labels.max(initial=0))
    if n == 0:
        return []
    at = np.flatnonzero(labels)  # the buildings' pixels alone: a tile is mostly background
    own = labels.ravel()[at]
    counts = np.bincount(own, minlength=n + 1)
    sums = (np.bincount(own, weights=prob_u8.ravel()[at], minlength=n + 1) if prob_u8 is not None
            else counts * 255.0)
    best: dict[int, object] = {}
    for geom, value in shapes(labels, mask=labels > 0, connectivity=4,
                              transform=Affine.translation(col_off, row_off)):
        label, polygon = int(value), polygon_of(geom)
        if label not in best or polygon.area > best[label].area:
            best[label] = polygon
    return [Piece(best[k], int(counts[k]), float(sums[k])) for k in sorted(best)]


def _unit(a) -> np.ndarray:
    """A map as float32 0..1 (uint8 means value / 255)."""
    a = np.asarray(a)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255)
    return a.astype(np.float32, copy=False)


def _instances(mask, prob, border, contact, seed_threshold: float, seed_min_px: int, blobs=None) -> np.ndarray:
    """Labels of the buildings of `mask` (bool), blob by blob: a blob with one seed is that seed's building
    and a blob without one is a building of its own; only a blob holding several seeds is flooded, on a
    crop of it alone. So a blob's labels depend only on its own pixels, ties included (skimage breaks
    equal-value ties by heap order, which one watershed over many blobs lets the other blobs change), and
    a crop of a blob labels it the same; on a 1024^2 tile this takes half the CPU of one watershed over
    the array. Labels: seeds 1..k in raster order, then the seedless blobs in raster order. `blobs`: the
    mask's 4-connected components as cv2.connectedComponentsWithStats gives them, if the caller has them."""
    mask = np.asarray(mask, bool)
    if blobs is None:
        blobs = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    n_blobs, blobs, boxes, _ = blobs
    if border is None and contact is None:
        return blobs
    at = np.flatnonzero(mask)  # the score is needed on the blobs only: a tile is mostly background
    score = _score(*(None if m is None else np.asarray(m).ravel()[at] for m in (prob, border, contact)), len(at))
    seeded = np.zeros(mask.shape, np.uint8)
    seeded.ravel()[at[score >= seed_threshold]] = 1
    _, seeds, stats, _ = cv2.connectedComponentsWithStats(seeded, connectivity=4, ltype=cv2.CV_32S)
    keep = stats[:, cv2.CC_STAT_AREA] >= seed_min_px
    keep[0] = False
    lut = np.where(keep, np.cumsum(keep), 0).astype(np.int32)
    k = int(keep.sum())
    at = np.flatnonzero(seeds.ravel())
    blob_of_seed = np.zeros(k + 1, np.int32)
    blob_of_seed[lut[seeds.ravel()[at]]] = blobs.ravel()[at]  # a seed lies in one blob
    per_blob = np.bincount(blob_of_seed[1:], minlength=n_blobs)
    label_of_blob = np.zeros(n_blobs, np.int32)
    label_of_blob[blob_of_seed[1:]] = np.arange(1, k + 1, dtype=np.int32)  # right for one-seed blobs
    seedless = np.flatnonzero(per_blob[1:] == 0) + 1
    label_of_blob[seedless] = k + 1 + np.arange(len(seedless), dtype=np.int32)
    labels = label_of_blob[blobs]
    crowded = np.flatnonzero(per_blob[1:] > 1) + 1
    if len(crowded):
        from skimage.segmentation import watershed  # only instance maps need it

        for b in crowded:
            x, y, w, h = boxes[b, :4]
            rows, cols = slice(y, y + h), slice(x, x + w)
            inside = blobs[rows, cols] == b
            crop = _score(*(None if m is None else np.asarray(m)[rows, cols] for m in (prob, border, contact)), (h, w))
            flooded = watershed(1 - crop, np.where(inside, lut[seeds[rows, cols]], 0), mask=inside, connectivity=1)
            labels[rows, cols][inside] = flooded[inside]
    return labels


def _score(prob, border, contact, shape) -> np.ndarray:
    """Where a building's inner part is: building x (1 - border) x (1 - contact), float32 0..1, element by
    element (so a crop or a selection of pixels gets the values of the whole map's); a missing map counts
    as building 1, border or contact 0."""
    score = _unit(prob) if prob is not None else np.ones(shape, np.float32)
    for m in (border, contact):
        if m is not None:
            score = score * (1 - _unit(m))
    return score


@dataclass
class _Part:
    """A blob (or the blobs joined so far) that may go on in a later block: its pixels and map crops."""

    row: int
    col: int
    mask: np.ndarray  # bool [h, w]: this blob's pixels only
    maps: np.ndarray  # uint8 [C, h, w]: prob (+ border, contact)

    @property
    def bottom(self) -> int:
        return self.row + self.mask.shape[0]

    @property
    def right(self) -> int:
        return self.col + self.mask.shape[1]

    def window(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """This blob's mask over rows r0:r1, columns c0:c1 of the scene (False outside its crop)."""
        out = np.zeros((r1 - r0, c1 - c0), bool)
        a0, a1, b0, b1 = max(r0, self.row), min(r1, self.bottom), max(c0, self.col), min(c1, self.right)
        if a0 < a1 and b0 < b1:
            out[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = self.mask[a0 - self.row:a1 - self.row,
                                                              b0 - self.col:b1 - self.col]
        return out


class InstancePolygonizer(Polygonizer):
    """`lib.footprints.Polygonizer` for instances: one `Piece` per building, whatever the blocks.

    Blocks come in the same order (bands of rows top to bottom, a band's column blocks left to right).
    A blob that does not touch an inner block edge is complete and labelled at once. One that does is
    kept as a crop (its pixels and uint8 map crops) in `open`; when a new band starts, the crops that
    meet across block edges (4-adjacent pixels) are pasted together, and the joined blobs that end above
    the new band are labelled and finished -- so only blobs on the open seam stay in memory. Without
    border and contact maps every blob is one footprint, as with `Polygonizer`. Every block must come
    with the same maps (all with border/contact, or none).
    """

    def __init__(self, height: int, width: int, sink=None, *, seed_threshold: float, seed_min_px: int):
        super().__init__(height, width, sink)
        self.seed_threshold, self.seed_min_px = seed_threshold, seed_min_px
        self.open: list[_Part] = []  # kept blobs as raster crops (Polygonizer keeps polygons)
        self._channels: int | None = None  # 1: probability only; 3: with border and contact

    def add(self, row_off: int, mask: np.ndarray, prob_u8: np.ndarray | None = None, col_off: int = 0,
            border_u8: np.ndarray | None = None, contact_u8: np.ndarray | None = None) -> None:
        self._next_block(row_off)
        mask = np.asarray(mask, bool)
        maps = self._stack(mask.shape, prob_u8, border_u8, contact_u8)
        h, w = mask.shape
        if h == 0 or w == 0 or not mask.any():
            return
        components = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)
        _, cc, stats, _ = components
        top, left = stats[:, cv2.CC_STAT_TOP], stats[:, cv2.CC_STAT_LEFT]
        bottom, right = top + stats[:, cv2.CC_STAT_HEIGHT], left + stats[:, cv2.CC_STAT_WIDTH]
        touches = (((top == 0) & (row_off > 0)) | ((bottom == h) & (row_off + h < self.height))
                   | ((left == 0) & (col_off > 0)) | ((right == w) & (col_off + w < self.width)))
        touches[0] = False
        for i in np.flatnonzero(touches):
            rows, cols = slice(top[i], bottom[i]), slice(left[i], right[i])
            self.open.append(_Part(row_off + int(top[i]), col_off + int(left[i]), cc[rows, cols] == i,
                                   maps[:, rows, cols].copy()))
        if touches.any():
            self._emit(self._pieces(mask & ~touches[cc], maps, row_off, col_off))
        else:  # every blob is complete: the components just found are the ones to label
            self._emit(self._pieces(mask, maps, row_off, col_off, components))

    def _stack(self, shape, prob_u8, border_u8, contact_u8) -> np.ndarray:
        """The block's maps as uint8 [C, h, w] (no probability: 255; one of border/contact missing: 0)."""
        channels = 1 if border_u8 is None and contact_u8 is None else 3
        if self._channels is None:
            self._channels = channels
        if channels != self._channels:
            raise ValueError("every block needs the same maps: border/contact for all blocks or for none")
        given = [prob_u8] if channels == 1 else [prob_u8, border_u8, contact_u8]
        fill = [255, 0, 0]
        return np.stack([np.asarray(m, np.uint8) if m is not None else np.full(shape, f, np.uint8)
                         for m, f in zip(given, fill)])

    def _pieces(self, mask: np.ndarray, maps: np.ndarray, row_off: int, col_off: int, blobs=None) -> list[Piece]:
        border, contact = (maps[1], maps[2]) if len(maps) == 3 else (None, None)
        labels = _instances(mask, maps[0], border, contact, self.seed_threshold, self.seed_min_px, blobs)
        return instance_pieces(labels, maps[0], row_off, col_off)

    def _close_seams(self, row: int) -> None:
        """Join the kept blobs that meet; label and finish those that end above `row` (no later block
        reaches them)."""
        if not self.open:
            return
        joined = [group[0] if len(group) == 1 else _paste(group) for group in _groups(self.open)]
        self.open = [p for p in joined if p.bottom >= row]
        finished = []
        for p in joined:
            if p.bottom < row:
                finished.extend(self._pieces(p.mask, p.maps, p.row, p.col))
        self._emit(finished)


def _groups(parts: list[_Part]) -> list[list[_Part]]:
    """The parts joined by 4-adjacent pixels (union-find over parts whose crops touch), in first-seen order."""
    boxes = shapely.box([p.col for p in parts], [p.row for p in parts], [p.right for p in parts],
                        [p.bottom for p in parts])
    first, second = shapely.STRtree(boxes).query(boxes, predicate="intersects")
    root = list(range(len(parts)))

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    for i, j in zip(first.tolist(), second.tolist()):
        if i < j and find(i) != find(j) and _adjacent(parts[i], parts[j]):
            root[max(find(i), find(j))] = min(find(i), find(j))
    groups: dict[int, list[_Part]] = {}
    for i, p in enumerate(parts):
        groups.setdefault(find(i), []).append(p)
    return list(groups.values())


def _adjacent(a: _Part, b: _Part) -> bool:
    """Whether a pixel of `a` has a 4-neighbour in `b` (the parts never share pixels)."""
    r0, r1 = max(a.row - 1, b.row), min(a.bottom + 1, b.bottom)
    c0, c1 = max(a.col - 1, b.col), min(a.right + 1, b.right)
    if r0 >= r1 or c0 >= c1:
        return False
    m = a.window(r0 - 1, r1 + 1, c0 - 1, c1 + 1)
    near = m[1:-1, 1:-1] | m[:-2, 1:-1] | m[2:, 1:-1] | m[1:-1, :-2] | m[1:-1, 2:]
    return bool((near & b.window(r0, r1, c0, c1)).any())


def _paste(group: list[_Part]) -> _Part:
    """One part from several: their pixels and map values in the crop of their union."""
    row, col = min(p.row for p in group), min(p.col for p in group)
    bottom, right = max(p.bottom for p in group), max(p.right for p in group)
    mask = np.zeros((bottom - row, right - col), bool)
    maps = np.zeros((len(group[0].maps), bottom - row, right - col), np.uint8)
    for p in group:
        rows, cols = slice(p.row - row, p.bottom - row), slice(p.col - col, p.right - col)
        mask[rows, cols] |= p.mask
        view = maps[:, rows, cols]
        view[:, p.mask] = p.maps[:, p.mask]
    return _Part(row, col, mask, maps)
