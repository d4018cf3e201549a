"""Built-in Spawrious-structured benchmark, drawn procedurally by index (no files, no downloads).

Four object classes that differ by shape only (bulldog = square, dachshund = long ellipse, labrador =
triangle, corgi = plus-shaped cross), each with a random position, scale, rotation and colour (the colour
distribution is the same for every class), drawn with a dark one-pixel outline on one of six background
textures (desert = orange dunes, jungle = green foliage blotches, dirt = speckled brown, mountain = grey peaks
under a blue sky, snow = white with blue-grey flecks, beach = sea above sand). Backgrounds differ in colour
and texture and are far easier to learn than the object, so the spurious cue wins unless a method resists it.

Every image is a pure function of ``(seed, stream, generation index)``: a ``numpy.random.Generator`` seeded
with ``[seed, stream, index]`` draws its parameters, and the result is quantised to 8 bits, so the same
options give the same tensors on any machine and in any DataLoader worker. Streams: 0 = the training pool
(train + val), 1 = test, 2 = oracle_val.
"""

from __future__ import annotations

import colorsys
import logging
import math
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import torch

from ex2l_xai.data.base import GroupDataset, carve_validation
from ex2l_xai.data.challenges import (
    BACKGROUNDS,
    CLASSES,
    ENV_NAMES,
    get_challenge,
    test_plan,
    train_plan,
)
from ex2l_xai.errors import DataError

log = logging.getLogger(__name__)

SYNTHETIC_SPLITS: tuple[str, ...] = ("train", "val", "test", "oracle_val")
STREAMS: dict[str, int] = {"train": 0, "val": 0, "test": 1, "oracle_val": 2}
N_VARIANTS = 4  # texture variants per background in the bank
BENCHMARKS: dict[str, dict[str, Any]] = {
    # Calibrated (docs/results.md, figures/calibrate.py): ERM with the pretrained preset lands in the paper's range
    # (test AA 60-80 %, WGA far below it) and a probe on frozen features fitted on oracle_val reads the class at
    # ~100 %: the benchmark where methods can differ.
    "m2m_hard_salient": {"challenge": "m2m_hard", "object_scale": 1.5},
    # Waterbirds-style: 5 % of each class's images on the other class pair's backgrounds; at the ceiling for a
    # pretrained backbone (frozen features alone reach 93 % test WGA): checks that a method does no harm.
    "m2m_hard_min5": {"challenge": "m2m_hard", "minority_fraction": 0.05},
}
"""Named benchmark variants (``benchmark=NAME``): the options each one sets."""
_VARIANT_DEFAULTS = {"challenge": "m2m_hard", "object_scale": 1.0, "minority_fraction": 0.0}


def resolve_benchmark(benchmark: str | None, **options: Any) -> dict[str, Any]:
    """The options ``challenge``, ``object_scale`` and ``minority_fraction`` after a named ``benchmark``
    (:data:`BENCHMARKS`) sets its own; an option given with another value than the benchmark's is a DataError
    naming both (an option left at its default takes the benchmark's value)."""
    out = dict(options)
    if benchmark in (None, "", "none"):
        return out
    if benchmark not in BENCHMARKS:
        raise DataError(f"option benchmark={benchmark!r}; expected one of {', '.join(BENCHMARKS)} (or none)")
    for key, value in BENCHMARKS[benchmark].items():
        given = out.get(key, _VARIANT_DEFAULTS[key])
        if given != _VARIANT_DEFAULTS[key] and given != value:
            raise DataError(f"option {key}={given!r} contradicts benchmark={benchmark!r}, which sets {key}={value!r}")
        out[key] = value
    return out
SCALE_RANGE = (0.12, 0.19)  # object size: pixels per shape unit, as a fraction of the image side
OUTLINE_PX = 1.0
_ROUNDER = np.float32(1.5 * 2**23)

# Background base colours (RGB in [0, 1]); patterns are added in _texture.
_SKY = (0.60, 0.76, 0.95)
_ROCK = (0.40, 0.40, 0.45)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: float) -> np.ndarray:
    """Value noise in [0, 1]: a random grid of about ``cells`` cells per ``h`` rows, bilinearly upsampled."""
    gh = int(math.ceil(cells)) + 2
    gw = int(math.ceil(cells * w / h)) + 2
    grid = rng.random((gh, gw))
    y = np.arange(h) / h * cells
    x = np.arange(w) / h * cells
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    g00 = grid[y0][:, x0]
    g01 = grid[y0][:, x0 + 1]
    g10 = grid[y0 + 1][:, x0]
    g11 = grid[y0 + 1][:, x0 + 1]
    return g00 * (1 - fy) * (1 - fx) + g01 * (1 - fy) * fx + g10 * fy * (1 - fx) + g11 * fy * fx


def _mix(a: tuple[float, float, float], b: tuple[float, float, float], t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of colours a and b with weight ``t`` (HxW) -> 3xHxW."""
    ca = np.asarray(a)[:, None, None]
    cb = np.asarray(b)[:, None, None]
    return ca + (cb - ca) * t[None]


def _texture(background: int, size: int, tile: int, rng: np.random.Generator) -> np.ndarray:
    """One 3 x tile x tile texture of ``background`` for images of side ``size``."""
    yy, xx = np.mgrid[0:tile, 0:tile].astype(np.float64) / size  # in image-side units
    phase = rng.random() * 2 * np.pi
    fine = rng.random((tile, tile))
    name = BACKGROUNDS[background]
    if name == "desert":
        dunes = np.sin(2 * np.pi * (yy * 3.5 + 0.3 * np.sin(2 * np.pi * xx * 1.2 + phase)))
        img = _mix((0.80, 0.58, 0.28), (0.98, 0.82, 0.52), 0.5 + 0.5 * dunes)
        img += 0.03 * (fine[None] - 0.5)
    elif name == "jungle":
        blobs = _smooth_noise(rng, tile, tile, 6.0 * tile / size)
        leaves = np.clip((blobs - 0.35) * 2.5, 0, 1)
        img = _mix((0.05, 0.28, 0.08), (0.30, 0.66, 0.18), leaves)
        vines = np.sin(2 * np.pi * xx * 9 + phase + 2 * blobs) > 0.92
        img[:, vines] *= 0.6
        img += 0.06 * (fine[None] - 0.5)
    elif name == "dirt":
        pebbles = _smooth_noise(rng, tile, tile, 14.0 * tile / size)
        img = _mix((0.36, 0.23, 0.13), (0.55, 0.40, 0.27), np.clip((pebbles - 0.55) * 4, 0, 1))
        img += 0.16 * (fine[None] - 0.5)
    elif name == "mountain":
        ridge = np.abs(((xx * 2.2 + phase / (2 * np.pi)) % 1.0) - 0.5) * 2  # triangle wave in [0, 1]
        horizon = 0.55 * tile / size + 0.28 * (ridge - 0.5)  # rows below the horizon are rock
        rock = yy > horizon
        shade = _smooth_noise(rng, tile, tile, 5.0 * tile / size)
        img = np.where(
            rock[None],
            _mix(_ROCK, (0.62, 0.62, 0.66), shade),
            _mix(_SKY, (0.82, 0.90, 1.0), np.clip(1 - yy * size / tile, 0, 1)),
        )
        cap = rock & (yy < horizon + 0.06)
        img[:, cap] = 0.95
        img += 0.03 * (fine[None] - 0.5)
    elif name == "snow":
        drift = _smooth_noise(rng, tile, tile, 3.0 * tile / size)
        img = _mix((0.86, 0.89, 0.95), (0.98, 0.99, 1.0), drift)
        flecks = fine > 0.93
        img[:, flecks] = np.asarray((0.62, 0.70, 0.84))[:, None]
    elif name == "beach":
        shore = 0.55 * tile / size + 0.04 * np.sin(2 * np.pi * xx * 2 + phase)
        sea = yy < shore
        waves = (np.sin(2 * np.pi * (yy * 12 + 0.2 * np.sin(2 * np.pi * xx * 3 + phase))) > 0.8) & sea
        img = np.where(
            sea[None],
            _mix((0.08, 0.32, 0.66), (0.16, 0.50, 0.82), yy / yy.max()),
            _mix((0.90, 0.80, 0.55), (0.98, 0.92, 0.72), fine),
        )
        img[:, waves] = np.asarray((0.75, 0.88, 0.98))[:, None]
    else:  # pragma: no cover - BACKGROUNDS is fixed
        raise DataError(f"no texture for background {name!r}")
    return np.clip(img, 0, 1).astype(np.float32)


@lru_cache(maxsize=4)
def texture_bank(size: int) -> np.ndarray:
    """Textures of every background: float32 array (6, N_VARIANTS, 3, tile, tile), tile = size * 3 // 2.

    Built once per image size from a fixed seed (independent of the dataset seed); images crop it at random
    offsets.
    """
    tile = size + size // 2
    bank = np.empty((len(BACKGROUNDS), N_VARIANTS, 3, tile, tile), dtype=np.float32)
    for b in range(len(BACKGROUNDS)):
        for k in range(N_VARIANTS):
            bank[b, k] = _texture(b, size, tile, np.random.default_rng([20240611, b, k]))
    return bank


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float32) + 0.5
    return c[None, :], c[:, None]  # x (1, S), y (S, 1)


def render(
    label: int, background: int, rng: np.random.Generator, size: int = 64, object_scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image of class ``label`` on ``background`` with random parameters from ``rng``.

    ``object_scale`` multiplies the object's size (1 = the default range, at most 1.5 so it stays inside).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Image float32 3xSxS in [0, 1] (multiples of 1/255) and mask bool SxS (object and its outline).
    """
    p = rng.random(16)
    img = _background(background, p, size)

    scale = object_scale * size * (SCALE_RANGE[0] + (SCALE_RANGE[1] - SCALE_RANGE[0]) * p[8])  # px per shape unit
    theta = 2 * math.pi * p[9]
    margin = 1.75 * scale
    cx = margin + (size - 2 * margin) * p[10]
    cy = margin + (size - 2 * margin) * p[11]
    # Only the object's bounding box is computed (every shape fits in a disc of radius 1.6 units).
    reach = 1.6 * scale + OUTLINE_PX + 1.0
    y0, y1 = max(0, int(cy - reach)), min(size, int(math.ceil(cy + reach)))
    x0, x1 = max(0, int(cx - reach)), min(size, int(math.ceil(cx + reach)))
    x, y = _grid(size)
    dx, dy = x[:, x0:x1] - np.float32(cx), y[y0:y1] - np.float32(cy)
    c, s = math.cos(theta) / scale, math.sin(theta) / scale
    u = dx * c + dy * s  # object coordinates (shape units)
    if label == 0:  # bulldog: square
        v = dy * c - dx * s
        g = np.maximum(np.abs(u), np.abs(v)) - 0.87
    elif label == 1:  # dachshund: long ellipse (a = 1.6, b = 0.6), distance via the gradient
        v = dy * c - dx * s
        a2, b2 = 1.6**2, 0.6**2
        uu, vv = u * u, v * v
        f = uu * (1 / a2) + vv * (1 / b2) - 1
        g = f / (2 * np.sqrt(uu * (1 / a2**2) + vv * (1 / b2**2)) + 1e-3)
    elif label == 2:  # labrador: equilateral triangle, inradius 0.76
        g = None
        for alpha in (0.5 * math.pi, 0.5 * math.pi + 2 * math.pi / 3, 0.5 * math.pi + 4 * math.pi / 3):
            ca, sa = math.cos(theta + alpha) / scale, math.sin(theta + alpha) / scale
            d = dx * ca + dy * sa
            g = d if g is None else np.maximum(g, d)
        g = g - 0.76
    else:  # corgi: plus-shaped cross, arms 1.2 long, 0.38 half-wide
        v = dy * c - dx * s
        au, av = np.abs(u), np.abs(v)
        g = np.minimum(np.maximum(au - 1.2, av - 0.38), np.maximum(au - 0.38, av - 1.2))
    inner = g <= 0
    outer = g <= OUTLINE_PX / scale

    h, sat, val = p[12], 0.55 + 0.45 * p[13], 0.55 + 0.45 * p[14]
    colour = np.asarray(colorsys.hsv_to_rgb(h, sat, val), dtype=np.float32)[:, None, None]
    box = img[:, y0:y1, x0:x1]
    np.copyto(box, np.float32(0.06), where=outer)  # outline
    np.copyto(box, colour * (0.86 + 0.08 * u), where=inner)  # object, lit from one side
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = outer
    return _quantise(img), mask


def _background(background: int, p: np.ndarray, size: int) -> np.ndarray:
    """The background of an image (3xSxS float32, before quantisation) from its parameters ``p[0:8]``."""
    bank = texture_bank(size)
    tile = bank.shape[-1]
    max_off = tile - size
    k = int(p[0] * N_VARIANTS)
    oy, ox = int(p[1] * (max_off + 1)), int(p[2] * (max_off + 1))
    bg = bank[background, k, :, oy : oy + size, ox : ox + size]
    if p[3] < 0.5:
        bg = bg[:, :, ::-1]
    gain = (1.0 + 0.16 * (p[4:7] - 0.5) + 0.10 * (p[7] - 0.5)).astype(np.float32)[:, None, None]
    return bg * gain


def _quantise(img: np.ndarray) -> np.ndarray:
    """Clip at 1 and round to multiples of 1/255, in place: identical tensors across machines despite last-bit
    float differences (adding and subtracting 1.5 * 2**23 rounds a float32 in [0, 255] to the nearest integer)."""
    np.minimum(img, 1.0, out=img)
    img *= 255
    img += _ROUNDER
    img -= _ROUNDER
    img *= np.float32(1 / 255)
    return img


def render_background(background: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """The background alone that :func:`render` draws with the same ``rng`` state, without the object.

    :func:`render` draws its background from ``p[0:8]`` and its object from ``p[8:15]`` of one ``rng.random(16)``,
    so ``render(label, b, rng_copy)`` equals this image outside the object mask, pixel for pixel.

    Returns
    -------
    numpy.ndarray
        Image float32 3xSxS in [0, 1] (multiples of 1/255).
    """
    return _quantise(_background(background, rng.random(16), size))


class SyntheticDataset(GroupDataset):
    """Spawrious-structured benchmark drawn on the fly (see the module docstring).

    Parameters
    ----------
    split : str
        ``train``, ``val``, ``test`` or ``oracle_val`` (a validation split drawn from the test
        environment with its own random stream, disjoint from test, for oracle model selection).
    challenge : str
        ``o2o_easy``, ``o2o_medium``, ``o2o_hard``, ``m2m_easy``, ``m2m_medium`` or ``m2m_hard``.
    image_size : int
        Side of the square images in pixels.
    per_group : int
        Images per class and training environment before validation is carved out (the role of Spawrious's
        3168).
    test_per_group : int or None
        Test images per class (default ``per_group``); M2M classes split them over their two test backgrounds.
    oracle_per_group : int or None
        oracle_val images per class (default ``round(val_fraction * test_per_group)``, at least 1).
    seed : int
        Seeds the images and the validation carve (an integer >= 0).
    val_fraction : float
        Share of each (class, background, env) cell of the training pool moved to ``val``.
    minority_fraction : float
        Share of each class's training images (per environment) moved onto the other class group's
        backgrounds (see :func:`ex2l_xai.data.challenges.train_plan`); 0 = Spawrious's exact table.
    object_scale : float
        Multiplies the object's size, in [0.5, 1.5] (default 1: objects cover about 6-14 % of the image; 1.5:
        about 14-30 %). Larger objects make the shape easier to learn: the study's calibration knob.
    benchmark : str or None
        A named variant of :data:`BENCHMARKS` that sets ``challenge``, ``object_scale`` and
        ``minority_fraction`` (e.g. ``m2m_hard_salient``: m2m_hard with objects 1.5x, the calibrated benchmark).
    """

    name = "synthetic"
    splits = SYNTHETIC_SPLITS
    has_masks = True

    def __init__(
        self,
        split: str = "train",
        challenge: str = "m2m_hard",
        image_size: int = 64,
        per_group: int = 200,
        test_per_group: int | None = None,
        oracle_per_group: int | None = None,
        seed: int = 0,
        val_fraction: float = 0.2,
        minority_fraction: float = 0.0,
        object_scale: float = 1.0,
        benchmark: str | None = None,
    ) -> None:
        opts = resolve_benchmark(benchmark, challenge=challenge, object_scale=object_scale,
                                 minority_fraction=minority_fraction)
        challenge, object_scale, minority_fraction = opts["challenge"], opts["object_scale"], opts["minority_fraction"]
        self.benchmark = benchmark if benchmark not in ("", "none") else None
        self.challenge = get_challenge(challenge)
        self.image_size = _positive_int(image_size, "image_size", minimum=16)
        self.per_group = _positive_int(per_group, "per_group")
        self.test_per_group = (
            self.per_group if test_per_group is None else _positive_int(test_per_group, "test_per_group")
        )
        if oracle_per_group is None:
            oracle_per_group = max(1, int(float(val_fraction) * self.test_per_group + 0.5))
        self.oracle_per_group = _positive_int(oracle_per_group, "oracle_per_group")
        self.seed = _positive_int(seed, "seed", minimum=0)
        self.val_fraction = float(val_fraction)
        self.minority_fraction = float(minority_fraction)
        try:
            self.object_scale = float(object_scale)
        except (TypeError, ValueError):
            self.object_scale = float("nan")
        if not 0.5 <= self.object_scale <= 1.5:
            raise DataError(f"option object_scale={object_scale!r}; expected a number in [0.5, 1.5]")
        if split not in self.splits:
            raise DataError(
                f"unknown split {split!r} for dataset 'synthetic'; expected one of {', '.join(self.splits)}"
            )

        if split in ("train", "val"):
            cells = train_plan(self.challenge, self.per_group, self.minority_fraction)
        elif split == "test":
            cells = test_plan(self.challenge, self.test_per_group)
        else:
            cells = test_plan(self.challenge, self.oracle_per_group)
        reps = [c.count for c in cells]
        pool = pd.DataFrame(
            {
                "label": np.repeat([c.label for c in cells], reps),
                "confounder": np.repeat([c.confounder for c in cells], reps),
                "env": np.repeat([c.env for c in cells], reps),
            }
        )
        pool["gen_index"] = np.arange(len(pool))
        if split in ("train", "val"):
            kept, carved = carve_validation(pool, self.val_fraction, self.seed)
            pool = pool.iloc[kept if split == "train" else carved]
        self.stream = STREAMS[split]
        self._gen_index = pool["gen_index"].to_numpy().copy()
        super().__init__(split, pool.drop(columns="gen_index"), CLASSES, BACKGROUNDS, ENV_NAMES)

    def _empty_hint(self) -> str:
        ch, vf, pg = self.challenge.name, self.val_fraction, self.per_group
        return f" (challenge {ch}, val_fraction={vf}, per_group={pg})"

    def generator(self, index: int) -> np.random.Generator:
        """The random generator that draws sample ``index`` (seeded with [seed, stream, generation index])."""
        return np.random.default_rng([self.seed, self.stream, int(self._gen_index[index])])

    def render_numpy(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image (float32 3xSxS) and boolean mask (SxS) of sample ``index`` as numpy arrays."""
        return render(
            int(self._labels[index]),
            int(self._confounders[index]),
            self.generator(index),
            self.image_size,
            self.object_scale,
        )

    def render_on_background(
        self, index: int, background: int, *, draw_object: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index``'s own object (same shape, pose, size, colour: pixel for pixel inside its mask) drawn on
        another ``background`` id; ``draw_object=False`` draws that background alone (all-False mask).

        With the sample's own background this is :meth:`render_numpy`. The background's texture crop, flip and
        gain are the sample's own too (they come from the same random draws).
        """
        if not 0 <= int(background) < len(BACKGROUNDS):
            raise DataError(f"background={background!r}; expected an id in [0, {len(BACKGROUNDS)})")
        rng = self.generator(index)
        if not draw_object:
            img = render_background(int(background), rng, self.image_size)
            return img, np.zeros((self.image_size, self.image_size), dtype=bool)
        return render(int(self._labels[index]), int(background), rng, self.image_size, self.object_scale)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draw sample ``index``: image float 3xSxS in [0, 1] and mask float 1xSxS."""
        img, mask = self.render_numpy(index)
        return torch.from_numpy(img), torch.from_numpy(mask[None].astype(np.float32))


def _positive_int(value: object, option: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, or DataError naming the option."""
    try:
        out = int(value)  # type: ignore[call-overload]
        ok = float(value) == out and not isinstance(value, bool)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ok = False
    if not ok or out < minimum:
        raise DataError(f"option {option}={value!r}; expected an integer >= {minimum}")
    return out
