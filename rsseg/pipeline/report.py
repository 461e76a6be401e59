"""Run reports: quick-look PNGs and a self-contained ``report.html``.

Quick-looks read little: a few tiles of a test set, and scenes through a decimated read (GDAL averages
blocks into a small array), so they cost the same for a 2,000 or a 50,000 pixel scene.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import rasterio
import shapely
from PIL import Image, ImageDraw
from rasterio.enums import Resampling

from rsseg.fileio import atomic_path, raster_env
from rsseg.tianchi.files import read_masks_csv

__all__ = ["scene_quicklook", "tiles_quicklook", "write_report"]

log = logging.getLogger(__name__)


def tiles_quicklook(images_dir: Path, submission: Path, out: Path, n: int = 8, size: int = 256) -> Path:
    """A strip of the first ``n`` test tiles, each beside itself with the predicted mask tinted red."""
    table = read_masks_csv(submission)
    names = list(table)[:n]
    sheet = Image.new("RGB", (2 * size, size * max(len(names), 1)), "white")
    for i, name in enumerate(names):
        with Image.open(images_dir / name) as image:
            rgb = np.asarray(image.convert("RGB"))
        mask = np.ascontiguousarray(table.mask(name, rgb.shape[:2])).astype(bool)
        tinted = rgb.copy()
        tinted[mask] = (0.5 * tinted[mask] + 0.5 * np.array([255, 0, 0])).astype(np.uint8)
        for j, arr in enumerate((rgb, tinted)):
            sheet.paste(Image.fromarray(arr).resize((size, size)), (j * size, i * size))
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


def scene_quicklook(scene: Path, vectors: Path, out: Path, max_size: int = 1024) -> Path:
    """The scene, decimated to at most ``max_size`` pixels a side, with the buildings' outlines in yellow."""
    with raster_env(), rasterio.open(scene) as src:
        scale = max(src.width, src.height) / max_size
        shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
        bands = [1, 2, 3] if src.count >= 3 else [1]
        data = src.read(bands, out_shape=(len(bands), *shape), resampling=Resampling.average)
        inverse = ~(src.transform @ src.transform.scale(src.width / shape[1], src.height / shape[0]))
        crs = src.crs
    data = data.astype(np.float32)
    lo, hi = np.percentile(data, (1, 99))
    rgb = np.clip((data - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    image = Image.fromarray(np.moveaxis(rgb, 0, -1) if len(bands) == 3 else rgb[0]).convert("RGB")
    gdf = pyogrio.read_dataframe(vectors)
    if crs is not None and gdf.crs is not None:
        gdf = gdf.to_crs(crs)
    draw = ImageDraw.Draw(image)
    a, b, c, d, e, f = inverse.a, inverse.b, inverse.c, inverse.d, inverse.e, inverse.f
    pixel = shapely.transform(gdf.geometry.values, lambda xy: np.column_stack(
        (a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f)))
    for poly in shapely.get_parts(pixel):
        if isinstance(poly, shapely.Polygon):
            draw.line(list(poly.exterior.coords), fill=(255, 255, 0), width=1)
    with atomic_path(out) as tmp:
        image.save(tmp, format="PNG")
    return out


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">' \
           f"<figcaption>{html.escape(str(path.parent.name + '/' + path.name))}</figcaption></figure>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items() if not isinstance(v, dict | list))
    return html.escape(str(value))


def write_report(workdir: Path, name: str, manifests: list[dict[str, Any]]) -> Path:
    """Write ``workdir/report.html``: stage timings, training curves, metrics and quick-looks, embedded."""
    rows = "".join(
        f"<tr><td>{html.escape(m['stage'])}</td><td>{html.escape(m['uses'])}</td>"
        f"<td>{'resumed' if m.get('skipped') else 'ran'}</td><td>{m.get('seconds', 0):.1f}</td>"
        f"<td>{m.get('tasks', '')}</td><td>{_fmt(m.get('summary', {}))}</td></tr>" for m in manifests)
    figures, metrics = [], []
    for m in manifests:
        stage_dir = workdir / m["stage"]
        figures += [_img(p) for p in sorted(stage_dir.glob("*.png"))]
        for js in ("score.json", "evaluation.json", "summary.json"):
            if (stage_dir / js).exists():
                text = json.dumps(json.loads((stage_dir / js).read_text()), indent=2)
                metrics.append(f"<h3>{html.escape(m['stage'])}/{js}</h3><pre>{html.escape(text)}</pre>")
        if (stage_dir / "metrics.csv").exists():
            metrics.append(f"<h3>{html.escape(m['stage'])}/metrics.csv</h3>"
                           f"<pre>{html.escape((stage_dir / 'metrics.csv').read_text())}</pre>")
    total = sum(m.get("seconds", 0) for m in manifests if not m.get("skipped"))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rsseg run: {html.escape(name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}img{{max-width:100%}}
figure{{margin:1em 0}}pre{{background:#f6f6f6;padding:8px;overflow:auto}}</style></head><body>
<h1>rsseg run: {html.escape(name)}</h1>
<p>Work directory: <code>{html.escape(str(workdir))}</code>. Stage time this run: {total:.1f} s.</p>
<h2>Stages</h2><table><tr><th>stage</th><th>kind</th><th>status</th><th>seconds</th><th>tasks</th>
<th>summary</th></tr>{rows}</table>
<h2>Metrics</h2>{''.join(metrics) or '<p>none</p>'}
<h2>Curves and quick-looks</h2>{''.join(figures) or '<p>none</p>'}
</body></html>
"""
    out = workdir / "report.html"
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("wrote %s", out)
    return out
