"""Synthetic demo data in the exact Kaggle HAM10000 layout, so every stage runs without a download.

Each image is a lesion blob (irregular ellipse) on noisy skin. The seven classes differ in colour
AND in texture/shape at a scale that survives a 64x64 input (vascular lobules, blue-grey nests,
a central white scar, black blotches...), while lesion position, size, orientation, skin tone,
lighting, vignetting and hairs vary, so no single pixel gives the class away and a Grad-CAM map
has to look at the lesion. Like HAM10000, about a quarter of the lesions are photographed more
than once; the extra photos re-render the same lesion (same shape, colours and texture) with a
small shift, rotation, scale and lighting change, on freshly noised skin of the same patient.

Output (`out_dir`):
    HAM10000_metadata.csv       lesion_id,image_id,dx,dx_type,age,sex,localization
    HAM10000_images_part_1/     first half of the image ids, <image_id>.jpg, 600x450 (W x H)
    HAM10000_images_part_2/     second half
    demo_lesions.csv            image_id,cx,cy,rx,ry: lesion centre and radii in image pixels
    demo_manifest.json          generation parameters; written last, marks a complete set

Same seed and parameters -> identical files, byte for byte (each image has its own RNG stream,
so the thread pool's scheduling does not matter).
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from keras_ham.errors import KerasHamError
from keras_ham.io_utils import atomic_path, write_csv_atomic, write_json_atomic
from keras_ham.labels import CLASS_NAMES
from keras_ham.metadata import IMAGE_PART_DIRS, METADATA_COLUMNS

METADATA_FILE = "HAM10000_metadata.csv"
LESIONS_FILE = "demo_lesions.csv"
MANIFEST_FILE = "demo_manifest.json"
LESION_COLUMNS = ("image_id", "cx", "cy", "rx", "ry")
GENERATOR_VERSION = 1

#: HAM10000 image counts per class (10,015 images); the demo keeps their proportions.
HAM10000_CLASS_COUNTS = {"akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142}

#: 520 lesions with a floor of 25 per class -> nv 316, mel 52, bkl 52, bcc/akiec/df/vasc 25, and
#: 704 images (26 % of lesions have 2-4 photos). A lesion-grouped 64/16/20 split then leaves
#: 5 test and 4 validation lesions for each rare class and ~450 training images: few enough to
#: train from scratch at 64 px in a couple of CPU minutes (a 4-layer CNN reaches ~0.9 balanced
#: test accuracy in 15 epochs, ~30 s on 2 cores), and generated in ~13 CPU seconds.
DEFAULT_NUM_LESIONS = 520
MIN_LESIONS_PER_CLASS = 25

#: Share of HAM10000 lesions with several images (1,956 of 7,470) and, among those, how many.
MULTI_IMAGE_LESION_SHARE = 0.26
EXTRA_IMAGE_COUNTS = (2, 3, 4)
EXTRA_IMAGE_PROBS = (0.73, 0.25, 0.02)

JPEG_QUALITY = 90

_DX_TYPES = {  # HAM10000 dx_type shares per class
    "akiec": {"histo": 1.0},
    "bcc": {"histo": 1.0},
    "bkl": {"histo": 0.70, "consensus": 0.24, "confocal": 0.06},
    "df": {"consensus": 0.52, "histo": 0.48},
    "mel": {"histo": 1.0},
    "nv": {"follow_up": 0.55, "histo": 0.37, "consensus": 0.08},
    "vasc": {"consensus": 0.53, "histo": 0.47},
}
_MEAN_AGE = {"akiec": 67, "bcc": 67, "bkl": 64, "df": 53, "mel": 61, "nv": 46, "vasc": 51}
_LOCALIZATIONS = {
    "back": 2192, "lower extremity": 2077, "trunk": 1404, "upper extremity": 1118, "abdomen": 1022,
    "face": 745, "chest": 407, "foot": 319, "unknown": 234, "neck": 168, "scalp": 128, "hand": 90,
    "ear": 56, "genital": 48,
}  # fmt: skip
_SEXES = {"male": 0.54, "female": 0.455, "unknown": 0.005}


class DemoDataError(KerasHamError, ValueError):
    """Bad demo-data parameters, or an existing folder that holds a different demo set."""


# ----------------------------------------------------------------------------- plan (pure)


def allocate_lesions(num_lesions: int, min_per_class: int = MIN_LESIONS_PER_CLASS) -> dict[str, int]:
    """Lesions per class: HAM10000 proportions, each class at least `min_per_class`, summing to
    exactly `num_lesions` (classes below the floor are fixed at it, the rest share the remainder
    proportionally, largest remainder rounding)."""
    if min_per_class < 1:
        raise DemoDataError(f"min_lesions_per_class must be >= 1, received {min_per_class}.")
    if num_lesions < min_per_class * len(CLASS_NAMES):
        raise DemoDataError(
            f"num_lesions must be >= {len(CLASS_NAMES)} x {min_per_class} = {len(CLASS_NAMES) * min_per_class} "
            f"(every class needs {min_per_class} lesions), received {num_lesions}."
        )
    counts: dict[str, int] = {}
    free = list(CLASS_NAMES)
    while True:
        remaining = num_lesions - sum(counts.values())
        total_weight = sum(HAM10000_CLASS_COUNTS[name] for name in free)
        share = {name: remaining * HAM10000_CLASS_COUNTS[name] / total_weight for name in free}
        below = [name for name in free if share[name] < min_per_class]
        if not below:
            break
        for name in below:
            counts[name] = min_per_class
            free.remove(name)
    floors = {name: math.floor(share[name]) for name in free}
    leftover = remaining - sum(floors.values())
    by_remainder = sorted(free, key=lambda name: (floors[name] - share[name], CLASS_NAMES.index(name)))
    for name in by_remainder[:leftover]:
        floors[name] += 1
    counts.update(floors)
    return {name: counts[name] for name in CLASS_NAMES}


def _choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    probs = np.array([weights[name] for name in names], dtype=float)
    return names[int(rng.choice(len(names), p=probs / probs.sum()))]


def plan_demo_metadata(num_lesions: int, min_per_class: int, seed: int) -> pd.DataFrame:
    """The metadata table (one row per image) with an internal `lesion_index` and `photo_index`
    column saying which lesion each image renders and which photo of it it is."""
    rng = np.random.default_rng([seed, 0])
    counts = allocate_lesions(num_lesions, min_per_class)
    dx_per_lesion = np.array([name for name in CLASS_NAMES for _ in range(counts[name])])
    rng.shuffle(dx_per_lesion)
    photos = np.ones(num_lesions, dtype=int)
    num_multi = min(num_lesions, max(1, round(MULTI_IMAGE_LESION_SHARE * num_lesions)))
    multi = rng.choice(num_lesions, size=num_multi, replace=False)
    photos[multi] = rng.choice(EXTRA_IMAGE_COUNTS, size=num_multi, p=EXTRA_IMAGE_PROBS)
    lesion_numbers = rng.permutation(num_lesions) + 1
    image_numbers = rng.permutation(int(photos.sum())) + 1
    rows = []
    next_image = 0
    for lesion_index, dx in enumerate(dx_per_lesion):
        age = float(np.clip(5 * round(rng.normal(_MEAN_AGE[dx], 15) / 5), 5, 85))
        patient = {
            "lesion_id": f"HAM_{lesion_numbers[lesion_index]:07d}",
            "dx": str(dx),
            "dx_type": _choice(rng, _DX_TYPES[dx]),
            "age": f"{age:.1f}",
            "sex": _choice(rng, _SEXES),
            "localization": _choice(rng, _LOCALIZATIONS),
        }
        for photo_index in range(photos[lesion_index]):
            image_id = f"ISIC_{image_numbers[next_image]:07d}"
            rows.append({**patient, "image_id": image_id, "lesion_index": lesion_index, "photo_index": photo_index})
            next_image += 1
    frame = pd.DataFrame(rows).sort_values(["lesion_id", "image_id"], ignore_index=True)
    return frame[[*METADATA_COLUMNS, "lesion_index", "photo_index"]]


def part_dir_of(image_id: str, num_images: int) -> str:
    """Kaggle splits the images by id: the first half in part 1, the rest in part 2."""
    return IMAGE_PART_DIRS[0] if int(image_id.split("_")[1]) <= (num_images + 1) // 2 else IMAGE_PART_DIRS[1]


# ----------------------------------------------------------------------------- rendering

_CLASS_COLOURS = {  # RGB 0..255 of each class's main tones; each class has its own dominant hue
    "nv": {"base": (140, 92, 62), "centre": (108, 68, 46)},
    "mel": {"base": (92, 58, 40), "black": (32, 24, 24), "veil": (96, 108, 134), "light": (150, 104, 74)},
    "bkl": {"base": (192, 152, 104), "milia": (240, 234, 214), "comedo": (92, 66, 46)},
    "bcc": {"base": (240, 224, 228), "nest": (84, 100, 150), "vessel": (178, 36, 48)},
    "df": {"base": (146, 98, 72), "pink": (206, 140, 128), "scar": (246, 240, 236)},
    "akiec": {"base": (208, 88, 74), "scale": (236, 214, 160)},
    "vasc": {"red": (176, 34, 54), "purple": (104, 36, 88), "septum": (214, 168, 170)},
}
#: Border softness (normalised radius units), harmonic amplitude range and axis ratio per class.
_EDGE_SOFTNESS = {"nv": 0.06, "mel": 0.05, "bkl": 0.12, "bcc": 0.10, "df": 0.12, "akiec": 0.22, "vasc": 0.04}
_IRREGULARITY = {
    "nv": (0.0, 0.03), "mel": (0.06, 0.13), "bkl": (0.02, 0.07), "bcc": (0.02, 0.06),
    "df": (0.0, 0.04), "akiec": (0.03, 0.09), "vasc": (0.02, 0.06),
}  # fmt: skip
_AXIS_RATIO = {"nv": (0.85, 1.0), "mel": (0.6, 0.9), "bkl": (0.65, 0.95), "bcc": (0.7, 1.0),
               "df": (0.85, 1.0), "akiec": (0.65, 0.95), "vasc": (0.75, 1.0)}  # fmt: skip
#: Semi-major axis as a fraction of the image height (df lesions are small, mel large).
_SIZE = {"nv": (0.15, 0.26), "mel": (0.2, 0.3), "bkl": (0.17, 0.28), "bcc": (0.16, 0.27),
         "df": (0.14, 0.2), "akiec": (0.16, 0.27), "vasc": (0.15, 0.23)}  # fmt: skip
_HARMONICS = np.arange(2, 7)
_GRID_EXTENT = 1.6  # texture grids cover [-1.6, 1.6]^2 in normalised lesion coordinates


@dataclass
class LesionSpec:
    """Everything that stays the same across photos of one lesion (in normalised coordinates,
    where the base ellipse has radius 1)."""

    dx: str
    semi_major: float  # fraction of image height
    axis_ratio: float
    angle: float
    amplitudes: np.ndarray
    phases: np.ndarray
    colours: dict[str, np.ndarray]
    skin: np.ndarray
    grids: list[np.ndarray]
    spots: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # u, v, radius, mix
    vessels: list[np.ndarray] = field(default_factory=list)  # polylines in (u, v)

    @property
    def max_radius(self) -> float:
        """Largest normalised radius of the border, including the soft edge."""
        return (1.0 + float(np.abs(self.amplitudes).sum())) * (1.0 + _EDGE_SOFTNESS[self.dx] / 2)


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], spread: float = 0.07) -> np.ndarray:
    return np.clip(np.array(colour, dtype=np.float32) * rng.uniform(1 - spread, 1 + spread, 3), 0, 255)


def _random_walk(rng: np.random.Generator, start: np.ndarray, steps: int, step: float) -> np.ndarray:
    heading = rng.uniform(0, 2 * np.pi)
    points = [start]
    for _ in range(steps):
        heading += rng.normal(0, 0.5)
        points.append(points[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
    return np.array(points)


def make_lesion_spec(dx: str, rng: np.random.Generator) -> LesionSpec:
    """Draw one lesion's shape, colours and texture."""
    low, high = _IRREGULARITY[dx]
    spec = LesionSpec(
        dx=dx,
        semi_major=float(rng.uniform(*_SIZE[dx])),
        axis_ratio=float(rng.uniform(*_AXIS_RATIO[dx])),
        angle=float(rng.uniform(0, np.pi)),
        amplitudes=rng.uniform(low, high, len(_HARMONICS)) / np.sqrt(_HARMONICS - 1),
        phases=rng.uniform(0, 2 * np.pi, len(_HARMONICS)),
        colours={name: _jitter(rng, rgb) for name, rgb in _CLASS_COLOURS[dx].items()},
        skin=_jitter(rng, tuple(np.array((232, 196, 178)) * rng.uniform(0.86, 1.0)), 0.04),
        grids=[rng.standard_normal((cells + 1, cells + 1)).astype(np.float32) for cells in (6, 10, 24)],
    )
    if dx == "bkl":  # milia-like cysts (white, mix=1) and comedo-like openings (dark, mix=0)
        count = int(rng.integers(6, 12))
        radius, angle = np.sqrt(rng.uniform(0, 0.55, count)), rng.uniform(0, 2 * np.pi, count)
        spec.spots = np.column_stack(
            [radius * np.cos(angle), radius * np.sin(angle), rng.uniform(0.07, 0.12, count), rng.integers(0, 2, count)]
        )
    elif dx == "bcc":  # blue-grey ovoid nests and arborizing vessels
        count = int(rng.integers(3, 6))
        radius, angle = np.sqrt(rng.uniform(0, 0.35, count)), rng.uniform(0, 2 * np.pi, count)
        spec.spots = np.column_stack(
            [radius * np.cos(angle), radius * np.sin(angle), rng.uniform(0.18, 0.27, count), np.ones(count)]
        )
        for _ in range(int(rng.integers(3, 6))):
            trunk = _random_walk(rng, rng.uniform(-0.5, 0.5, 2), 10, 0.09)
            spec.vessels.append(trunk)
            for _ in range(2):
                spec.vessels.append(_random_walk(rng, trunk[int(rng.integers(2, 9))], 5, 0.07))
    elif dx == "vasc":  # lobules: u, v, radius, red-vs-purple mix
        count = int(rng.integers(3, 7))
        radius, angle = np.sqrt(rng.uniform(0, 0.35, count)), rng.uniform(0, 2 * np.pi, count)
        spec.spots = np.column_stack(
            [radius * np.cos(angle), radius * np.sin(angle), rng.uniform(0.3, 0.48, count), rng.uniform(0, 1, count)]
        )
    return spec


def _sample_grid(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smooth value noise: bilinear (smoothstep) sample of `grid` at normalised lesion coords."""
    n = grid.shape[0] - 1
    gx = np.clip((u + _GRID_EXTENT) * (n / (2 * _GRID_EXTENT)), 0, n - 1e-3)
    gy = np.clip((v + _GRID_EXTENT) * (n / (2 * _GRID_EXTENT)), 0, n - 1e-3)
    x0, y0 = gx.astype(np.int32), gy.astype(np.int32)
    fx, fy = gx - x0, gy - y0
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
    bottom = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _mix(colour: np.ndarray, other: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Blend an (h, w, 3) colour field toward `other` (3,) by `weight` (h, w) in [0, 1]."""
    weight = np.clip(weight, 0, 1, dtype=np.float32)[..., None]
    return colour + (np.asarray(other, dtype=np.float32) - colour) * weight


def _step(x: np.ndarray, width: float = 0.15) -> np.ndarray:
    """Soft threshold at 0: 0 below -width, 1 above +width."""
    return np.clip(x / (2 * width) + 0.5, 0, 1)


def _spot_distance(spec: LesionSpec, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(k, h, w) distance to each spot centre, in units of that spot's radius."""
    su, sv, sr = (spec.spots[:, i, None, None].astype(np.float32) for i in range(3))
    return np.sqrt((u - su) ** 2 + (v - sv) ** 2) / sr


def _paint(spec: LesionSpec, u: np.ndarray, v: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Colour field (h, w, 3) of the lesion's inside, by class."""
    c = spec.colours
    coarse, medium, fine = (_sample_grid(grid, u, v) for grid in spec.grids)
    shape = (*u.shape, 3)
    if spec.dx == "nv":  # uniform brown, darker round centre, faint network
        colour = _mix(np.broadcast_to(c["centre"], shape), c["base"], d**2)
        return colour * (1 + 0.05 * fine[..., None])
    if spec.dx == "mel":  # dark, asymmetric black blotches, blue-grey veil, lighter patches
        colour = _mix(np.broadcast_to(c["base"], shape), c["black"], _step(coarse - 0.2))
        colour = _mix(colour, c["veil"], 0.8 * _step(medium - 0.6))
        colour = _mix(colour, c["light"], _step(-coarse - 0.9) * (d > 0.4))
        return colour * (1 + 0.08 * fine[..., None])
    if spec.dx == "bkl":  # light brown, waxy cerebriform ridges, white and dark dots
        colour = np.broadcast_to(c["base"], shape) * (1 + 0.10 * np.sin(5 * medium) + 0.05 * coarse)[..., None]
        for dist, is_milia in zip(_spot_distance(spec, u, v), spec.spots[:, 3]):
            colour = _mix(colour, c["milia"] if is_milia else c["comedo"], _step(1 - dist, 0.25))
        return colour
    if spec.dx == "bcc":  # pearly translucent pink-white with blue-grey nests (vessels drawn later)
        colour = np.broadcast_to(c["base"], shape) * (1 + 0.04 * medium)[..., None]
        for dist in _spot_distance(spec, u, v):
            colour = _mix(colour, c["nest"], 0.9 * _step(1 - dist, 0.3))
        return colour
    if spec.dx == "df":  # brown delicate periphery, pink ring, central white scar patch
        colour = _mix(np.broadcast_to(c["base"], shape), c["pink"], _step(0.62 - d, 0.08))
        colour = _mix(colour, c["scar"], _step(0.45 + 0.06 * coarse - d, 0.06))
        return colour * (1 + 0.04 * fine[..., None])
    if spec.dx == "akiec":  # rough pink-red with whitish-yellow scale flecks
        colour = np.broadcast_to(c["base"], shape) * (1 + 0.06 * medium)[..., None]
        return _mix(colour, c["scale"], 0.85 * _step(medium - 0.9, 0.15))
    if spec.dx == "vasc":  # red/purple lobules separated by pale septa
        colour = np.broadcast_to(c["septum"], shape).copy()
        for dist, mix in zip(_spot_distance(spec, u, v), spec.spots[:, 3]):
            lobule = c["red"] * (1 - mix) + c["purple"] * mix
            shaded = _mix(np.broadcast_to(lobule, shape), lobule * 0.7, 1 - dist)
            colour = np.where((dist < 1)[..., None], _mix(colour, shaded, _step(1 - dist, 0.08)), colour)
        return colour * (1 + 0.03 * fine[..., None])
    raise DemoDataError(f"unknown class {spec.dx!r}; expected one of {', '.join(CLASS_NAMES)}.")  # pragma: no cover


@dataclass(frozen=True)
class Pose:
    """Where one photo shows its lesion: centre (pixels), scale, rotation."""

    cx: float
    cy: float
    scale: float
    angle: float


def _pose(spec: LesionSpec, rng: np.random.Generator, first: Pose | None, width: int, height: int) -> Pose:
    """Random placement well inside the image; later photos shift/rotate/scale the first one."""
    margin = 0.06 * min(width, height)
    if first is None:
        scale, angle = 1.0, spec.angle
    else:
        scale = first.scale * float(rng.uniform(0.9, 1.1))
        angle = first.angle + float(rng.uniform(-0.35, 0.35))
    # the lesion never comes closer than `margin` to a border, whatever its rotation
    extent = spec.semi_major * height * scale * spec.max_radius
    if extent > min(width, height) / 2 - margin:
        scale *= (min(width, height) / 2 - margin) / extent
        extent = min(width, height) / 2 - margin
    low_x, high_x, low_y, high_y = margin + extent, width - margin - extent, margin + extent, height - margin - extent
    if first is None:
        cx, cy = rng.uniform(low_x, high_x), rng.uniform(low_y, high_y)
    else:
        cx = first.cx + rng.normal(0, 0.04 * height)
        cy = first.cy + rng.normal(0, 0.04 * height)
    return Pose(float(np.clip(cx, low_x, high_x)), float(np.clip(cy, low_y, high_y)), scale, angle)


def _background(spec: LesionSpec, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Skin: the patient's tone, slow blotchy variation and redness, optional dark vignette."""
    low = rng.standard_normal((2, 5, 7)).astype(np.float32)
    fields = [
        np.asarray(Image.fromarray(noise, mode="F").resize((width, height), Image.Resampling.BICUBIC)) for noise in low
    ]
    skin = spec.skin * (1 + 0.04 * fields[0][..., None])
    skin = skin + np.array([5.0, -3.0, -3.0], dtype=np.float32) * fields[1][..., None]  # patchy redness
    if rng.random() < 0.4:  # dermatoscope's dark round field of view
        ys, xs = np.ogrid[:height, :width]
        r = np.sqrt(((xs - width / 2) / (width / 2)) ** 2 + ((ys - height / 2) / (height / 2)) ** 2)
        edge = rng.uniform(1.15, 1.35)
        skin = _mix(skin, np.array((18.0, 14.0, 14.0)), _step(r - edge, 0.06))
    return skin.astype(np.float32)


def _local_coords(spec: LesionSpec, pose: Pose, xs: np.ndarray, ys: np.ndarray, height: int):
    """Pixel centres -> normalised lesion coordinates (u, v) where the base ellipse has radius 1."""
    a = spec.semi_major * height * pose.scale
    b = a * spec.axis_ratio
    dx, dy = xs - pose.cx, ys - pose.cy
    cos, sin = math.cos(pose.angle), math.sin(pose.angle)
    return ((cos * dx + sin * dy) / a).astype(np.float32), ((-sin * dx + cos * dy) / b).astype(np.float32)


def _to_pixels(spec: LesionSpec, pose: Pose, uv: np.ndarray, height: int) -> np.ndarray:
    a = spec.semi_major * height * pose.scale
    b = a * spec.axis_ratio
    cos, sin = math.cos(pose.angle), math.sin(pose.angle)
    x = pose.cx + a * uv[:, 0] * cos - b * uv[:, 1] * sin
    y = pose.cy + a * uv[:, 0] * sin + b * uv[:, 1] * cos
    return np.column_stack([x, y])


def _draw_lines(size: tuple[int, int], lines: list[np.ndarray], width: int, blur: float) -> np.ndarray:
    """Antialiased-looking polylines as an (h, w) float mask in [0, 1]."""
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    for line in lines:
        draw.line([tuple(p) for p in line], fill=255, width=width, joint="curve")
    return np.asarray(canvas.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32) / 255.0


#: Photos are rendered at half size and upscaled (bicubic): 4x fewer pixels to paint, and the
#: soft look of a dermatoscope photo comes for free.
RENDER_SCALE = 0.5


def render_photo(
    spec: LesionSpec, pose: Pose, rng: np.random.Generator, width: int, height: int
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """One photo as (height, width, 3) uint8, and the lesion ellipse (cx, cy, rx, ry) in pixels:
    the smallest axis-aligned ellipse, centred on the lesion's bounding box with its aspect ratio,
    that contains every lesion pixel (inside the border)."""
    f = RENDER_SCALE
    rw, rh = max(16, round(width * f)), max(16, round(height * f))
    pose = Pose(pose.cx * rw / width, pose.cy * rh / height, pose.scale, pose.angle)
    image = _background(spec, rng, rw, rh)
    extent = spec.semi_major * rh * pose.scale * spec.max_radius + 2
    x0, x1 = max(0, int(pose.cx - extent)), min(rw, int(math.ceil(pose.cx + extent)))
    y0, y1 = max(0, int(pose.cy - extent)), min(rh, int(math.ceil(pose.cy + extent)))
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    u, v = _local_coords(spec, pose, xs, ys, rh)
    theta = np.arctan2(v, u)
    harmonics = np.cos(_HARMONICS[:, None, None] * theta + spec.phases[:, None, None])
    d = np.sqrt(u * u + v * v) / (1 + (spec.amplitudes[:, None, None] * harmonics).sum(0))
    alpha = np.clip((1 - d) / _EDGE_SOFTNESS[spec.dx] + 0.5, 0, 1)
    colour = _paint(spec, u, v, d)
    if spec.dx == "bcc":  # translucent, with thin red branching vessels on top
        alpha = alpha * 0.9
        lines = [_to_pixels(spec, pose, line, rh) - (x0, y0) for line in spec.vessels]
        vessels = _draw_lines((x1 - x0, y1 - y0), lines, max(1, round(rw / 260)), 0.4)
        colour = _mix(colour, spec.colours["vessel"], 0.9 * vessels * (d < 0.95))
    image[y0:y1, x0:x1] = _mix(image[y0:y1, x0:x1], colour, alpha)
    if rng.random() < 0.3:  # hairs: class-independent thin dark curves
        hairs = []
        for _ in range(int(rng.integers(1, 6))):
            ends = rng.uniform((0, 0), (rw, rh), (3, 2))
            t = np.linspace(0, 1, 24)[:, None]
            hairs.append((1 - t) ** 2 * ends[0] + 2 * (1 - t) * t * ends[1] + t**2 * ends[2])
        mask = _draw_lines((rw, rh), hairs, 1, 0.3)
        image = _mix(image, np.array((58.0, 42.0, 34.0)), 0.85 * mask)
    gain = rng.uniform(0.9, 1.08) * rng.uniform(0.97, 1.03, 3)  # lighting / white balance
    image = image * gain.astype(np.float32) + rng.standard_normal(image.shape, dtype=np.float32) * 3.0
    pixels = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC))
    inside_y, inside_x = np.nonzero(d < 1)
    px, py = (inside_x + x0 + 0.5) * width / rw, (inside_y + y0 + 0.5) * height / rh
    cx, cy = (px.min() + px.max()) / 2, (py.min() + py.max()) / 2
    hx, hy = (px.max() - px.min()) / 2 + width / rw, (py.max() - py.min()) / 2 + height / rh
    k = float(np.sqrt(((px - cx) / hx) ** 2 + ((py - cy) / hy) ** 2).max())
    return pixels, (float(cx), float(cy), k * hx, k * hy)


# ----------------------------------------------------------------------------- files


def _check_is_demo_folder(out_dir: Path) -> None:
    """Refuse a folder that holds real HAM10000 metadata: never overwrite a user's data."""
    if (out_dir / METADATA_FILE).is_file() and not (out_dir / LESIONS_FILE).is_file():
        raise DemoDataError(
            f"{out_dir} holds a {METADATA_FILE} without {LESIONS_FILE}, so it is not a demo set "
            "(real HAM10000 data?); make_demo_data never writes there: choose another folder."
        )


def _is_complete(out_dir: Path, manifest: dict, frame: pd.DataFrame) -> bool:
    """True when `out_dir` holds this very demo set (same parameters) with every image present.
    Raises `DemoDataError` when it holds a complete set made with other parameters."""
    manifest_path = out_dir / MANIFEST_FILE
    if not (manifest_path.is_file() and (out_dir / METADATA_FILE).is_file() and (out_dir / LESIONS_FILE).is_file()):
        return False
    try:
        existing = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if {key: existing.get(key) for key in manifest} != manifest:
        raise DemoDataError(
            f"{out_dir} already holds a demo set made with other parameters ({manifest_path}: {existing}); "
            "pass force=True (--force) to replace it, or choose another folder."
        )
    return all(path.is_file() for path in _image_paths(out_dir, frame["image_id"]))


def _image_paths(out_dir: Path, image_ids) -> list[Path]:
    image_ids = list(image_ids)
    return [out_dir / part_dir_of(image_id, len(image_ids)) / f"{image_id}.jpg" for image_id in image_ids]


def _remove_previous_images(out_dir: Path, frame: pd.DataFrame) -> None:
    """Delete the images of an earlier demo set here that the new set does not overwrite in place:
    ids it no longer has, and its ids now filed in the other part folder (which `index_images`
    would otherwise find first)."""
    ids = set(frame["image_id"])
    if (out_dir / METADATA_FILE).is_file():
        ids |= set(pd.read_csv(out_dir / METADATA_FILE, dtype=str, keep_default_na=False)["image_id"])
    keep = set(_image_paths(out_dir, frame["image_id"]))
    for image_id in sorted(ids):
        for part in IMAGE_PART_DIRS:
            path = out_dir / part / f"{image_id}.jpg"
            if path not in keep and path.is_file():
                path.unlink()


def _render_lesion(out_dir: Path, photos: pd.DataFrame, seed: int, width: int, height: int, num_images: int):
    """Render and write every photo of one lesion; (image_id, cx, cy, rx, ry) per photo."""
    lesion_index = int(photos["lesion_index"].iloc[0])
    spec = make_lesion_spec(photos["dx"].iloc[0], np.random.default_rng([seed, 1, lesion_index]))
    first: Pose | None = None
    ellipses = []
    for row in photos.sort_values("photo_index").itertuples():
        rng = np.random.default_rng([seed, 2, lesion_index, row.photo_index])
        pose = _pose(spec, rng, first, width, height)
        first = first or pose
        pixels, ellipse = render_photo(spec, pose, rng, width, height)
        with atomic_path(out_dir / part_dir_of(row.image_id, num_images) / f"{row.image_id}.jpg") as tmp:
            Image.fromarray(pixels).save(tmp, format="JPEG", quality=JPEG_QUALITY)
        ellipses.append((row.image_id, *ellipse))
    return ellipses


def make_demo_data(
    out_dir: str | os.PathLike,
    *,
    seed: int = 42,
    num_lesions: int = DEFAULT_NUM_LESIONS,
    min_lesions_per_class: int = MIN_LESIONS_PER_CLASS,
    image_size: tuple[int, int] = (600, 450),
    force: bool = False,
    workers: int | None = None,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Write a synthetic HAM10000-layout dataset to `out_dir` and return `out_dir`.

    `image_size` is (width, height). Skips the work when `out_dir` already holds a complete set
    made with the same parameters (unless `force`); raises `DemoDataError` when it holds one made
    with other parameters, or real HAM10000 metadata. Every file is written atomically and the
    manifest last, so a killed run is redone next time rather than trusted. `workers` threads
    render (default: up to 4); the output does not depend on it.
    """
    out_dir = Path(out_dir)
    width, height = (int(x) for x in image_size)
    if width < 32 or height < 32:
        raise DemoDataError(f"image_size must be at least (32, 32) (width, height), received {image_size!r}.")
    if seed < 0:
        raise DemoDataError(f"seed must be >= 0, received {seed}.")
    log = log or (lambda message: None)
    manifest = {
        "generator": "keras_ham.demo_data",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_lesions": int(num_lesions),
        "min_lesions_per_class": int(min_lesions_per_class),
        "image_size": [width, height],
    }
    frame = plan_demo_metadata(num_lesions, min_lesions_per_class, seed)
    num_images = len(frame)
    _check_is_demo_folder(out_dir)
    if not force and _is_complete(out_dir, manifest, frame):
        log(f"demo data already complete in {out_dir} ({num_images} images); pass --force to rebuild.")
        return out_dir
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    _remove_previous_images(out_dir, frame)
    log(f"writing {num_images} synthetic {width}x{height} images of {num_lesions} lesions to {out_dir} ...")
    started = time.perf_counter()
    lesions = [photos for _, photos in frame.groupby("lesion_index", sort=True)]
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        rendered = pool.map(lambda photos: _render_lesion(out_dir, photos, seed, width, height, num_images), lesions)
        ellipses = pd.DataFrame([row for rows in rendered for row in rows], columns=list(LESION_COLUMNS))
    ellipses = frame[["image_id"]].merge(ellipses, on="image_id", how="left").round(1)
    write_csv_atomic(out_dir / LESIONS_FILE, ellipses)
    write_csv_atomic(out_dir / METADATA_FILE, frame[list(METADATA_COLUMNS)])
    write_json_atomic(out_dir / MANIFEST_FILE, {**manifest, "num_images": num_images})
    log(f"wrote {num_images} images, {METADATA_FILE} and {LESIONS_FILE} in {time.perf_counter() - started:.1f} s")
    return out_dir
