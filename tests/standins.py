"""Stand-in models and images for the tiling, inference and ensemble tests: behaviour that no learned
weights can blur (a wrong TTA inverse, a seam, a stretched window shows up as a wrong value)."""

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin

from lib.cli import compose_config


class ConstantModel(torch.nn.Module):
    """Building probability `p` everywhere (2-class logits at stride 4), image-level probability `p`."""

    def __init__(self, p=0.7):
        super().__init__()
        self.logit = float(np.log(p / (1 - p)))
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        n, _, h, w = x.shape
        seg = torch.zeros(n, 2, h // 4, w // 4)
        seg[:, 1] = self.logit
        cls = torch.zeros(n, 2)
        cls[:, 1] = self.logit
        return {"seg": seg, "cls": cls}


class PooledBrightnessModel(torch.nn.Module):
    """Logits from the 4x4-pooled input: position-free, so every flip/transpose commutes with it.

    A TTA that is not undone exactly shows up as a mirrored/transposed map.
    """

    def forward(self, x):
        pooled = torch.nn.functional.avg_pool2d(x[:, :1] * 0.7 + x[:, 1:2] * 0.3, 4)
        return {"seg": torch.cat([torch.zeros_like(pooled), pooled], 1), "cls": pooled.mean((2, 3)).repeat(1, 2)}


class PositionalModel(PooledBrightnessModel):
    """Brightness plus a left-to-right ramp: not flip-invariant, so each TTA gives a different map."""

    def forward(self, x):
        out = super().forward(x)
        w = out["seg"].shape[-1]
        out["seg"][:, 1] += torch.linspace(-1.0, 1.0, w)
        return out


def gradient_image(h, w, seed=0):
    """An asymmetric image: ramps plus noise, so a wrong TTA inverse cannot go unnoticed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * yy) % 256], -1)
    return np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


def write_rgba(path, rgb, alpha, crs="EPSG:32632"):
    """A georeferenced RGBA GeoTIFF (10 cm pixels) whose alpha band marks the imagery."""
    h, w = alpha.shape
    profile = {"driver": "GTiff", "width": w, "height": h, "count": 4, "dtype": "uint8", "crs": crs,
               "transform": from_origin(500000, 4000000, 0.1, 0.1), "photometric": "RGB", "alpha": "YES"}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(np.moveaxis(rgb, -1, 0), [1, 2, 3])
        ds.write(alpha, 4)
    return path


def read(path):
    """(first band, profile) of a raster."""
    with rasterio.open(path) as ds:
        return ds.read(1), ds.profile


def infer_cfg(data_dir, model, out, *extra):
    """inference.py's config for a small, quick CPU run (PyTorch backend, no COG)."""
    overrides = [f"data_dir={data_dir}", f"model={model}", f"output_dir={out}", "tile_size=256", "width=64",
                 "overlap=64", "progress=false", "num_threads=1", "cog=false", "backend=torch", *extra]
    return compose_config("inference", overrides)


def polygonize(mask, prob_u8=None):
    """Footprints of a whole in-memory mask through the streaming Polygonizer (one band)."""
    from lib.footprints import Polygonizer

    p = Polygonizer(*mask.shape)
    p.add(0, mask, prob_u8)
    return p.finish()


def benchmark_module(name: str):
    """A script of benchmarks/ (not a package) loaded as a module, for its tests."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
