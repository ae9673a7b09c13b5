"""The embedded toy dataset: synthetic 'stuff' scenes generated locally from a seed.

Each image is a warped Voronoi layout of regions, each showing one of six texture classes (stripes, checkers,
noise, waves, gradient, dots) painted with two hues, its own and that of class ``c + 2``: no class can be told from
one pixel's colour, the texture decides. Regions jitter hue, saturation, brightness, orientation, phase and scale.

The ``parts`` world needs context: a class is two parts, each a fine texture of its own hue, laid out in a coarse
class-specific pattern (tiles, spots, bands, rings, blobs, zigzags) a few patches across. Part ``m`` belongs to
classes ``m`` and ``m - 1``, so only the surrounding parts and their layout tell a patch's class. Regions vary in
scale, orientation, phase and brightness, under a smooth illumination field.

On disk (what the folder loader reads)::

    <root>/toy/{train,val}/images/<00000>.png   RGB      (world "textures"; "parts": <root>/toy_parts)
    <root>/toy/{train,val}/labels/<00000>.png   class ids 0..n_classes-1 (uint8)
    <root>/toy/.complete.json                   written last: the generation parameters

Same parameters -> identical bytes (for the same numpy / Pillow versions).
"""

import colorsys
import contextlib
import json
import os

import numpy as np

from utils.atomic import atomic_save_image, atomic_write_bytes

TOY_CLASS_NAMES = ("stripes", "checkers", "noise", "waves", "gradient", "dots")
PARTS_CLASS_NAMES = ("tiles", "spots", "bands", "rings", "blobs", "zigzag")
TOY_WORLDS = ("textures", "parts")

MARKER = ".complete.json"
_SPLITS = {"train": 0, "val": 1}
_BASE_HUES = np.array([0.0, 0.17, 0.33, 0.5, 0.62, 0.8])


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled uniform noise: [size, size] in [0, 1], about ``cells`` blobs a side."""
    grid = rng.random((cells + 1, cells + 1))
    pos = np.linspace(0, cells, size, endpoint=False)
    i = pos.astype(np.int64)
    f = pos - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _layout(rng: np.random.Generator, size: int) -> np.ndarray:
    """Region index per pixel, [size, size]: nearest of 4-8 seeds in a warped plane."""
    n_regions = int(rng.integers(4, 9))
    seeds = rng.random((n_regions, 2))
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    yy = yy + 0.12 * (_smooth_noise(rng, size, 3) - 0.5)
    xx = xx + 0.12 * (_smooth_noise(rng, size, 3) - 0.5)
    dist = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
    return dist.argmin(0)


def _soft(x: np.ndarray, sharpness: float) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(sharpness * x)


def _texture(
    cls: int, u: np.ndarray, v: np.ndarray, period: np.ndarray, phase: np.ndarray, noise: np.ndarray
) -> np.ndarray:
    """Texture value in [0, 1] of class ``cls`` at rotated pixel coordinates u, v: [M] -> [M]."""
    a, b = 2 * np.pi * u / period + phase, 2 * np.pi * v / period
    if cls == 0:  # stripes
        return _soft(np.sin(a), 3.0)
    if cls == 1:  # checkers
        return _soft(np.sin(a) * np.sin(b + phase), 4.0)
    if cls == 2:  # smooth noise
        return noise
    if cls == 3:  # waves: stripes bent by a slower sine across them
        return _soft(np.sin(a + 2.0 * np.sin(b / 2.5)), 1.5)
    if cls == 4:  # gradient: a slow ramp
        return 0.5 + 0.5 * np.sin(a / 6.0)
    # dots on a lattice
    du = np.mod(u / period + phase / (2 * np.pi), 1.0) - 0.5
    dv = np.mod(v / period, 1.0) - 0.5
    return _soft(0.3 - np.sqrt(du * du + dv * dv), 25.0)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-region colours: [R] each -> [R, 3] in [0, 1]."""
    return np.array([colorsys.hsv_to_rgb(*hsv) for hsv in zip(np.mod(h, 1.0), s, v)]).reshape(-1, 3)


def _by_class(regions, label, n_classes, angle, origin):
    """For each class present: (class, its mask [S, S], the region of each of its pixels [M], the pixels'
    coordinates (u, v) [M] each, relative to their region's ``origin`` [R, 2] (x, y) and turned by its ``angle``)."""
    yy, xx = np.meshgrid(
        np.arange(label.shape[0], dtype=np.float64), np.arange(label.shape[1], dtype=np.float64), indexing="ij"
    )
    for cls in range(n_classes):
        mask = label == cls
        if mask.any():
            r = regions[mask]
            cos, sin = np.cos(angle[r]), np.sin(angle[r])
            x, y = xx[mask] - origin[r, 0], yy[mask] - origin[r, 1]
            yield cls, mask, r, x * cos + y * sin, -x * sin + y * cos


def toy_sample(rng: np.random.Generator, size: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image uint8 [size, size, 3], label uint8 [size, size] in 0..n_classes-1)."""
    regions = _layout(rng, size)
    n_regions = int(regions.max()) + 1
    region_class = rng.integers(0, n_classes, n_regions)
    hue_a = _BASE_HUES[region_class] + rng.uniform(-0.05, 0.05, n_regions)
    hue_b = _BASE_HUES[(region_class + 2) % len(_BASE_HUES)] + rng.uniform(-0.05, 0.05, n_regions)
    colour_a = _hsv_to_rgb(hue_a, rng.uniform(0.45, 0.9, n_regions), rng.uniform(0.45, 0.95, n_regions))
    colour_b = _hsv_to_rgb(hue_b, rng.uniform(0.45, 0.9, n_regions), rng.uniform(0.45, 0.95, n_regions))
    angle = rng.choice(np.deg2rad([0.0, 45.0, 90.0, 135.0]), n_regions) + rng.uniform(-0.2, 0.2, n_regions)
    period = 14.0 * size / 256 * rng.uniform(0.7, 1.4, n_regions)
    phase = rng.uniform(0, 2 * np.pi, n_regions)
    noise = _smooth_noise(rng, size, max(2, size // 24))

    label = region_class[regions]
    t = np.empty((size, size))
    for cls, mask, r, u, v in _by_class(regions, label, n_classes, angle, np.zeros((n_regions, 2))):
        t[mask] = _texture(cls, u, v, period[r], phase[r], noise[mask])
    rgb = colour_a[regions] * (1 - t[..., None]) + colour_b[regions] * t[..., None]
    rgb = rgb + rng.normal(0.0, 0.03, rgb.shape)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8), label.astype(np.uint8)


def _fine_texture(part: int, u: np.ndarray, v: np.ndarray, period: np.ndarray, grain: np.ndarray) -> np.ndarray:
    """Fine texture in [0, 1] of part ``part`` (a few pixels per period) at rotated coordinates: [M] -> [M]."""
    a, b = 2 * np.pi * u / period, 2 * np.pi * v / period
    if part == 0:  # fine stripes
        return _soft(np.sin(a), 2.0)
    if part == 1:  # fine dots
        du, dv = np.mod(u / period, 1.0) - 0.5, np.mod(v / period, 1.0) - 0.5
        return _soft(0.3 - np.sqrt(du * du + dv * dv), 20.0)
    if part == 2:  # fine checkers
        return _soft(np.sin(a) * np.sin(b), 3.0)
    if part == 3:  # cross-hatch
        return 0.5 * (_soft(np.sin(a), 4.0) + _soft(np.sin(b), 4.0))
    if part == 4:  # grain
        return grain
    return _soft(np.sin(a + 1.5 * np.sin(b / 2)), 2.0)  # fine ripples


def _layout_mask(cls: int, u: np.ndarray, v: np.ndarray, period: np.ndarray, blobs: np.ndarray) -> np.ndarray:
    """Which part (0: first, 1: second; soft) class ``cls`` shows at rotated coordinates: [M] -> [M]."""
    a, b = 2 * np.pi * u / period, 2 * np.pi * v / period
    if cls == 0:  # tiles
        return _soft(np.sin(a) * np.sin(b), 6.0)
    if cls == 1:  # spots
        du, dv = np.mod(u / period, 1.0) - 0.5, np.mod(v / period, 1.0) - 0.5
        return _soft(0.28 - np.sqrt(du * du + dv * dv), 25.0)
    if cls == 2:  # bands
        return _soft(np.sin(a), 5.0)
    if cls == 3:  # rings around a point of the region
        return _soft(np.sin(np.sqrt(u * u + v * v) * 2 * np.pi / period), 5.0)
    if cls == 4:  # blobs
        return _soft(blobs - 0.5, 12.0)
    return _soft(np.sin(a + 2.0 * np.sin(b / 2)), 4.0)  # zigzag


def parts_sample(rng: np.random.Generator, size: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene of the ``parts`` world: (image uint8 [size, size, 3], label uint8 [size, size])."""
    regions = _layout(rng, size)
    n_regions = int(regions.max()) + 1
    region_class = rng.integers(0, n_classes, n_regions)
    scale = size / 256 * rng.uniform(0.75, 1.35, n_regions)
    coarse_period = 44.0 * scale
    fine_period = 6.5 * scale * rng.uniform(0.85, 1.15, n_regions)
    angle = rng.uniform(0, np.pi, n_regions)
    centre = rng.uniform(0, size, (n_regions, 2))
    hue = (np.arange(n_classes) / n_classes + rng.uniform(-0.04, 0.04, (n_regions, n_classes))).ravel()
    sat = rng.uniform(0.45, 0.85, n_regions * n_classes)
    val = rng.uniform(0.55, 0.95, n_regions * n_classes)
    light_colours = _hsv_to_rgb(hue, sat, val).reshape(n_regions, n_classes, 3)  # each part's light and dark colour
    dark_colours = _hsv_to_rgb(hue, sat, 0.45 * val).reshape(n_regions, n_classes, 3)
    grain = _smooth_noise(rng, size, max(2, size // 4))
    blobs = _smooth_noise(rng, size, max(2, size // 40))
    light = 0.6 + 0.5 * _smooth_noise(rng, size, 2)

    label = region_class[regions]
    rgb = np.empty((size, size, 3))
    for cls, mask, r, u, v in _by_class(regions, label, n_classes, angle, centre):
        second = _layout_mask(cls, u, v, coarse_period[r], blobs[mask])[:, None]
        colour = np.zeros((len(r), 3))
        for side, part in ((1 - second, cls), (second, (cls + 1) % n_classes)):
            fine = _fine_texture(part, u, v, fine_period[r], grain[mask])[:, None]
            colour += side * (dark_colours[r, part] * (1 - fine) + light_colours[r, part] * fine)
        rgb[mask] = colour
    rgb = rgb * light[..., None] + rng.normal(0.0, 0.03, rgb.shape)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8), label.astype(np.uint8)


_SAMPLERS = {"textures": toy_sample, "parts": parts_sample}


def _write_split(toy_root: str, split: str, count: int, seed: int, size: int, n_classes: int, world: str):
    directories = [os.path.join(toy_root, split, kind) for kind in ("images", "labels")]
    names = [f"{i:05d}.png" for i in range(count)]
    for directory in directories:
        os.makedirs(directory, exist_ok=True)
    for i, name in enumerate(names):
        image_and_label = _SAMPLERS[world](np.random.default_rng([seed, _SPLITS[split], i]), size, n_classes)
        for directory, pixels in zip(directories, image_and_label):
            atomic_save_image(pixels, os.path.join(directory, name), compress_level=6)
    for directory in directories:
        for stale in set(os.listdir(directory)) - set(names):
            if stale.endswith(".png") and stale[:-4].isdigit():
                os.remove(os.path.join(directory, stale))


def toy_dir(root: str, world: str = "textures") -> str:
    """Where ``ensure_toy`` writes a world: ``<root>/toy`` for textures, ``<root>/toy_<world>`` otherwise."""
    if world not in TOY_WORLDS:
        raise ValueError(f"unknown toy world {world!r}; expected one of {', '.join(TOY_WORLDS)}")
    return os.path.join(root, "toy" if world == "textures" else f"toy_{world}")


def ensure_toy(
    root: str,
    seed: int = 0,
    n_train: int = 300,
    n_val: int = 100,
    size: int = 256,
    n_classes: int = 6,
    world: str = "textures",
) -> str:
    """Generate the toy ``world`` under ``root`` (``toy_dir``) unless a complete copy with these parameters is
    there; -> its path. The marker is written last, so an interrupted generation is redone on the next call."""
    toy_root = toy_dir(root, world)
    if not 2 <= n_classes <= len(TOY_CLASS_NAMES):
        raise ValueError(f"the toy dataset has 2..{len(TOY_CLASS_NAMES)} classes, got {n_classes}")
    if size < 16 or n_train < 1 or n_val < 1:
        raise ValueError(
            f"toy dataset needs size >= 16 and at least one image per split, "
            f"got size={size}, n_train={n_train}, n_val={n_val}"
        )
    params = {"seed": seed, "n_train": n_train, "n_val": n_val, "size": size, "n_classes": n_classes}
    if world != "textures":
        params["world"] = world
    marker = os.path.join(toy_root, MARKER)
    if os.path.isfile(marker):
        with open(marker) as f, contextlib.suppress(json.JSONDecodeError):
            if json.load(f) == params:
                return toy_root
        os.remove(marker)
    for split, count in (("train", n_train), ("val", n_val)):
        _write_split(toy_root, split, count, seed, size, n_classes, world)
    atomic_write_bytes(marker, json.dumps(params).encode())
    return toy_root
