import pickle

import numpy as np
import pytest
import rasterio.features
import shapely
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st

from rsseg.tiling.burn import Edges, burn, polygon_edges

# A real UTM transform (0.3 m pixels): pixel coordinates do not map exactly to metres, so ties at pixel
# centres are decided by GDAL's own floating-point arithmetic, which burn() must reproduce.
UTM = Affine(0.3, 0, 500000, 0, -0.3, 4000000)
# Pixel sizes and origin that are exact in binary: pixel <-> map coordinates round-trip exactly.
EXACT = Affine(0.5, 0, 1000, 0, -0.5, 2000)


def _reference(geoms, transform: Affine, shape, row_off: int, col_off: int, value: int = 1) -> np.ndarray:
    window = transform @ Affine.translation(col_off, row_off)
    return rasterio.features.rasterize(geoms, out_shape=shape, transform=window, fill=0, default_value=value,
                                       all_touched=False, dtype=np.uint8)


def _burned(geoms, transform: Affine, shape, row_off: int, col_off: int, value: int = 1) -> np.ndarray:
    edges = polygon_edges(geoms, transform).select(row_off, row_off + shape[0])
    return burn(edges, np.zeros(shape, np.uint8), row_off, col_off, value)


def _to_map(geom: shapely.Geometry, transform: Affine) -> shapely.Geometry:
    return shapely.affinity.affine_transform(geom, transform.to_shapely())


# Shapes in full-raster pixel coordinates; the window is rows 10-49, columns 20-63 (polygons overlap its
# borders). Vertices are snapped to a grid of 1/step pixels to hit the tie rules (vertices on pixel
# corners and centres, horizontal edges on scan lines, crossings exactly at pixel centres).
WINDOW = dict(row_off=10, col_off=20, shape=(40, 44))
coord = st.integers(8, 140)  # in half pixels: 4 .. 70 pixels
step = st.sampled_from([0, 1, 2, 4])  # 0: no snapping


def _snap(points: np.ndarray, grid: int) -> np.ndarray:
    return points if grid == 0 else np.round(points * grid) / grid


@st.composite
def rotated_rect(draw):
    cx, cy = draw(coord) / 2, draw(coord) / 2
    w, h = draw(st.floats(1, 30)), draw(st.floats(1, 30))
    angle = draw(st.sampled_from([0.0, 45.0, 90.0]) | st.floats(0, 180))
    box = shapely.affinity.rotate(shapely.box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), angle)
    return shapely.Polygon(_snap(np.asarray(box.exterior.coords), draw(step)))


@st.composite
def l_shape(draw):
    x0, y0 = draw(coord) / 2, draw(coord) / 2
    w, h = draw(st.integers(4, 60)) / 2, draw(st.integers(4, 60)) / 2
    cw, ch = draw(st.floats(0.2, 0.8)) * w, draw(st.floats(0.2, 0.8)) * h
    pts = np.array([(x0, y0), (x0 + w, y0), (x0 + w, y0 + ch), (x0 + cw, y0 + ch), (x0 + cw, y0 + h), (x0, y0 + h)])
    return shapely.Polygon(_snap(pts, draw(step)))


@st.composite
def triangle(draw):
    pts = np.array([(draw(coord), draw(coord)) for _ in range(3)]) / 2
    return shapely.Polygon(_snap(pts + np.array(draw(st.floats(0, 1))), draw(step)))


@st.composite
def holed(draw):
    x0, y0 = draw(coord) / 2, draw(coord) / 2
    w, h = draw(st.integers(6, 60)) / 2, draw(st.integers(6, 60)) / 2
    fx, fy = draw(st.floats(0.1, 0.5)), draw(st.floats(0.1, 0.5))
    hole = shapely.box(x0 + fx * w, y0 + fy * h, x0 + (1 - fx / 2) * w, y0 + (1 - fy / 2) * h)
    grid = draw(step)
    return shapely.Polygon(_snap(np.asarray(shapely.box(x0, y0, x0 + w, y0 + h).exterior.coords), grid),
                           [_snap(np.asarray(hole.exterior.coords), grid)])


@st.composite
def walk(draw):
    """A rectilinear ring (it may cross itself): many horizontal edges on scan lines."""
    n = draw(st.integers(2, 5))
    xs, ys = [draw(coord) / 2 for _ in range(n)], [draw(coord) / 2 for _ in range(n)]
    pts = [p for i in range(n) for p in ((xs[i], ys[i]), (xs[(i + 1) % n], ys[i]))]
    return shapely.Polygon(pts)


single = st.one_of(rotated_rect(), l_shape(), triangle(), holed(), walk())


@st.composite
def geometries(draw):
    geoms = draw(st.lists(single, min_size=1, max_size=4))
    geoms = [g for g in geoms if not g.is_empty and g.area > 0]
    if draw(st.booleans()):  # either ring orientation
        geoms = [shapely.orient_polygons(g, exterior_cw=draw(st.booleans())) for g in geoms]
    if len(geoms) > 1 and draw(st.booleans()):
        geoms = [shapely.MultiPolygon(geoms[:2]), *geoms[2:]]
    return geoms


# Transforms: north-up UTM, exact, south-up, one whose window origins are not exact in binary (where
# shifting full-raster pixel coordinates by the window offset would round differently from GDAL), and
# geographic (0.3 m in degrees, as rsseg.synth.generate places scenes in EPSG:4326).
TRANSFORMS = [UTM, EXACT, Affine(0.3, 0, 500000, 0, 0.3, 4000000),
              Affine(0.2985, 0, 256789.123456, 0, -0.2985, 3385012.7),
              Affine(2.6949458523585647e-06, 0, 114.3, 0, -2.6949458523585647e-06, 30.59)]


@settings(max_examples=1500)
@given(geoms=geometries(), transform=st.sampled_from(TRANSFORMS), far=st.booleans())
def test_burn_equals_rasterio(geoms, transform, far) -> None:
    """Far: the same shapes and window moved to row 17418, column 20019 of the raster."""
    shift = (20000, 17408) if far else (0, 0)
    geoms = [_to_map(shapely.affinity.translate(g, *shift), transform) for g in geoms if not g.is_empty]
    if not geoms:
        return
    window = dict(WINDOW, row_off=WINDOW["row_off"] + shift[1], col_off=WINDOW["col_off"] + shift[0])
    assert np.array_equal(_burned(geoms, transform, **window), _reference(geoms, transform, **window))


@settings(max_examples=100)
@given(geoms=geometries())
def test_pixel_edges_without_map_coordinates(geoms) -> None:
    """Edges built from pixel coordinates alone (no ``geo``): exact where the transform is exact."""
    geoms = [_to_map(g, EXACT) for g in geoms if not g.is_empty]
    if not geoms:
        return
    full = polygon_edges(geoms, EXACT)
    edges = Edges(full.x0, full.y0, full.x1, full.y1, full.polygon)
    out = burn(edges, np.zeros(WINDOW["shape"], np.uint8), WINDOW["row_off"], WINDOW["col_off"])
    assert np.array_equal(out, _reference(geoms, EXACT, **WINDOW))


def test_rotated_transform() -> None:
    transform = UTM @ Affine.rotation(17)
    geoms = [_to_map(shapely.box(25, 12, 60, 40), transform),
             _to_map(shapely.Polygon([(30, 15), (50, 45.5), (21.5, 30.5)]), transform)]
    assert np.array_equal(_burned(geoms, transform, **WINDOW), _reference(geoms, transform, **WINDOW))


def test_empty_inputs() -> None:
    edges = polygon_edges([], UTM)
    assert len(edges) == 0
    out = np.full((5, 9), 3, np.uint8)
    assert np.array_equal(burn(edges, out), np.full((5, 9), 3))
    empties = [shapely.Polygon(), shapely.MultiPolygon(), shapely.Point()]
    assert len(polygon_edges(np.array(empties, dtype=object), UTM)) == 0


def test_geometry_outside_the_window_burns_nothing() -> None:
    geom = _to_map(shapely.box(100, 100, 120, 130), UTM)
    out = _burned([geom], UTM, **WINDOW)
    assert not out.any()
    assert _burned([geom], UTM, shape=(40, 44), row_off=95, col_off=90).sum() == 20 * 30


def test_value_and_untouched_pixels() -> None:
    geoms = [_to_map(shapely.box(22, 11, 40.5, 30.5), UTM), _to_map(shapely.box(35, 25, 70, 45), UTM)]
    before = np.random.default_rng(0).integers(0, 256, WINDOW["shape"], dtype=np.uint8)
    inside = _reference(geoms, UTM, **WINDOW).astype(bool)
    edges = polygon_edges(geoms, UTM)
    out = burn(edges, before.copy(), WINDOW["row_off"], WINDOW["col_off"], value=7)
    assert np.array_equal(out, np.where(inside, 7, before))


@pytest.mark.parametrize("shape", [(40, 44), (13, 7), (1, 1)])
def test_odd_sizes_and_views(shape) -> None:
    """Widths whose pixel count is not a multiple of 8, and a non-contiguous ``out``."""
    geoms = [_to_map(shapely.Polygon([(18, 8), (70, 20), (30, 60)]), UTM)]
    ref = _reference(geoms, UTM, shape, 10, 20)
    big = np.zeros((shape[0], shape[1] * 2), np.uint8)
    view = big[:, ::2]
    burn(polygon_edges(geoms, UTM), view, 10, 20)
    assert np.array_equal(view, ref)
    assert not big[:, 1::2].any()


@pytest.mark.parametrize(
    ("geom", "kind"),
    [(shapely.Point(1, 2), "Point"), (shapely.LineString([(0, 0), (1, 1)]), "LineString"),
     (shapely.GeometryCollection([shapely.box(0, 0, 1, 1)]), "GeometryCollection"), (None, "None")],
)
def test_bad_geometry_type(geom, kind) -> None:
    with pytest.raises(ValueError, match=kind):
        polygon_edges(np.array([shapely.box(0, 0, 1, 1), geom], dtype=object), UTM)


def test_unclosed_rings_and_bad_coordinates() -> None:
    # One edge of a square: a ring that does not close leaves an odd crossing on its rows.
    edges = Edges(*(np.array([v], float) for v in (2.0, 1.0, 2.0, 9.0)), np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="not closed"):
        burn(edges, np.zeros((12, 12), np.uint8))
    with np.errstate(invalid="ignore"):  # shapely warns while building a ring with a NaN: that is the point
        bad = shapely.from_wkt("POLYGON ((0 0, 1 NaN, 1 1, 0 0))")
    with pytest.raises(ValueError, match="NaN"):
        polygon_edges([bad], UTM)


def test_bad_out() -> None:
    edges = polygon_edges([shapely.box(0, 0, 1, 1)], UTM)
    with pytest.raises(ValueError, match="uint8"):
        burn(edges, np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match="0-255"):
        burn(edges, np.zeros((4, 4), np.uint8), value=256)


def test_select_keeps_what_the_window_needs() -> None:
    geoms = [_to_map(shapely.box(0, 0, 200, 15), UTM), _to_map(shapely.box(5, 60, 30, 90), UTM)]
    edges = polygon_edges(geoms, UTM)
    chosen = edges.select(10, 50)
    assert 0 < len(chosen) < len(edges)
    assert set(chosen.polygon.tolist()) == {0}
    assert np.array_equal(burn(chosen, np.zeros((40, 44), np.uint8), 10, 20),
                          burn(edges, np.zeros((40, 44), np.uint8), 10, 20))


def test_multipolygon_parts_are_polygons() -> None:
    multi = shapely.MultiPolygon([shapely.box(0, 0, 2, 2), shapely.box(5, 5, 6, 6)])
    edges = polygon_edges([shapely.box(9, 9, 10, 10), multi], EXACT)
    assert edges.polygon.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_edges_pickle() -> None:
    geoms = [_to_map(shapely.box(22, 11, 40.5, 30.5), UTM)] * 50
    edges = polygon_edges(geoms, UTM)
    data = pickle.dumps(edges)
    assert len(data) < 100 * len(edges) + 1000
    back = pickle.loads(data)
    for name in ("x0", "y0", "x1", "y1", "polygon", "geo"):
        assert np.array_equal(getattr(back, name), getattr(edges, name))
    assert back.transform == edges.transform
    out = burn(back, np.zeros(WINDOW["shape"], np.uint8), WINDOW["row_off"], WINDOW["col_off"])
    assert np.array_equal(out, _reference(geoms[:1], UTM, **WINDOW))
