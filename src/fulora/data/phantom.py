"""Procedural B-mode-like fetal ultrasound images: the embedded demo data.

Each image is rendered the way a scanner forms one: an echogenicity map of plane-specific
anatomy is sampled along the beam lines of a sector (polar grid), multiplied by correlated
Rayleigh speckle, attenuated with depth and shadowed behind bone (cumulative along each beam),
log-compressed, then scan-converted into a fan on a black screen, with on-screen annotations.

The ``target`` domain is a different machine: narrower and deeper-starting sector, coarser
speckle, higher gain and lower dynamic range, stronger attenuation, electronic noise and
on-screen text. A classifier trained on ``source`` therefore faces a real, measurable domain
shift on ``target``, which is what the demo and the fast tests need when no real data exists.

Everything is deterministic: image ``index`` of plane ``p`` in domain ``d`` depends only on
(seed, d, p, index).

The premise, written down before any measurement (it mirrors the FU-LoRA paper's):

* **The foundation model** (``fulora.foundation``, SD1.5's stand-in) is pretrained without
  labels on a broad corpus: images from many simulated machines (each image its own machine,
  drawn from wide ranges of sector, depth, speckle, gain, dynamic range, attenuation, noise,
  blur and overlays) showing every kind of anatomy the phantom draws, captioned only by what a
  machine looks like ("an ultrasound image, bright, coarse speckle, wide sector"), never by a
  plane's name. The ``source`` and ``target`` machines are two points inside those ranges, as
  Spanish and African scanners are inside SD1.5's web-scale world.
* **The LoRA and the real-only classifiers** see 20 images per plane from one machine, the
  ``source`` (the paper's 20 Spanish images per plane). The plane words are learnt there only.
* **The zero-shot target** is the ``target`` machine, which neither the LoRA nor any
  classifier ever sees (the paper's African cohort).

The outcome (does synthetic data help on ``target``?) is measured in this world, not tuned.

Amended after the first measurement, and only here: with captions of the machine's look alone,
no LoRA could learn the planes (BENCHMARKS.md), so the shipped model's captions also say what a
viewer sees in plain visual words ("an oval ring", "a bright bar"), still never a plane's or an
organ's name (``fulora.foundation.corpus`` says why). The three roles above are unchanged.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from tqdm.auto import tqdm

from fulora.data.config import PHANTOM_PLANES, PhantomConfig
from fulora.data.manifest import MANIFEST_NAME, Manifest
from fulora.errors import DataError
from fulora.figures import image_grid
from fulora.io import atomic_path, write_text
from fulora.planes import PAPER_CAPTIONS, check_planes

logger = logging.getLogger("fulora")

Domain = Literal["source", "target"]
DOMAINS: tuple[str, ...] = ("source", "target")


@dataclass(frozen=True)
class ScannerStyle:
    """How one (simulated) machine forms its images; each value is jittered per image."""

    size: tuple[int, int]  # (height, width) of the screen
    half_angle_deg: float  # half the sector opening
    apex: float  # sector apex height, in image heights (negative: above the top edge)
    depth: float  # sector radius, in image heights
    speckle_sigma: tuple[float, float]  # speckle correlation (axial, lateral), polar samples
    dynamic_range_db: float  # display dynamic range (lower: harsher contrast)
    gain_db: float  # overall gain
    gamma: float
    attenuation: float  # depth attenuation (per image height) not compensated by TGC
    noise_db: float  # electronic noise floor, relative to the brightest echo
    blur: float  # lateral blur of the echo map (transducer resolution), in polar samples
    text: bool  # on-screen text and grey bar


STYLES: dict[str, ScannerStyle] = {
    "source": ScannerStyle(
        size=(200, 288),
        half_angle_deg=36.0,
        apex=-0.04,
        depth=1.0,
        speckle_sigma=(0.7, 1.0),
        dynamic_range_db=52.0,
        gain_db=0.0,
        gamma=1.0,
        attenuation=0.9,
        noise_db=-60.0,
        blur=0.0,
        text=False,
    ),
    "target": ScannerStyle(
        size=(216, 272),
        half_angle_deg=28.0,
        apex=-0.10,
        depth=0.95,
        speckle_sigma=(1.4, 2.2),
        dynamic_range_db=40.0,
        gain_db=5.0,
        gamma=0.85,
        attenuation=1.8,
        noise_db=-40.0,
        blur=1.2,
        text=True,
    ),
}


# --------------------------------------------------------------------------------------------
# Shapes on coordinate arrays. X, Y are in image heights; X = 0 is the sector's centre line.
# --------------------------------------------------------------------------------------------
def _rot(X, Y, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = X - cx, Y - cy
    return dx * c + dy * s, -dx * s + dy * c


def _ellipse_rho(X, Y, cx, cy, a, b, angle=0.0):
    u, v = _rot(X, Y, cx, cy, angle)
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def _soft(d, width):
    """1 inside (d > 0), 0 outside, with a smooth edge of ``width``."""
    return 0.5 * (1.0 + np.tanh(d / max(width, 1e-6)))


def _ellipse(X, Y, cx, cy, a, b, angle=0.0, edge=0.006):
    rho = _ellipse_rho(X, Y, cx, cy, a, b, angle)
    return _soft((1.0 - rho) * min(a, b), edge)


def _ring(X, Y, cx, cy, a, b, angle, thickness, edge=0.004):
    rho = _ellipse_rho(X, Y, cx, cy, a, b, angle)
    dist = np.abs(rho - 1.0) * min(a, b)
    return _soft(thickness / 2 - dist, edge)


def _segment(X, Y, x0, y0, x1, y1, width, edge=0.004, bend=0.0):
    """A thick (optionally bent) line segment from (x0, y0) to (x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy
    t = np.clip(((X - x0) * dx + (Y - y0) * dy) / length2, 0.0, 1.0)
    px, py = x0 + t * dx, y0 + t * dy
    if bend:
        length = math.sqrt(length2)
        offset = bend * length * 4 * t * (1 - t)
        px, py = px - offset * dy / length, py + offset * dx / length
    dist = np.sqrt((X - px) ** 2 + (Y - py) ** 2)
    return _soft(width / 2 - dist, edge)


def _paint(E, mask, value):
    """Paint ``value`` over ``E`` where ``mask`` (0..1) is on."""
    return E * (1.0 - mask) + value * mask


# --------------------------------------------------------------------------------------------
# Anatomy per plane: each returns (echo map, bone map) on the coordinate arrays.
# --------------------------------------------------------------------------------------------
def _background(X, Y, rng, style_depth):
    E = np.full_like(X, 0.02)  # amniotic fluid
    wall = rng.uniform(0.10, 0.20)
    bands = (
        0.55
        + 0.08 * np.sin(Y * rng.uniform(60, 110) + rng.uniform(0, 6))
        + 0.05 * np.sin(X * rng.uniform(8, 20))
    )
    E = _paint(E, _soft(wall - Y + 0.02 * np.sin(X * 9), 0.01), bands)
    E = _paint(E, _soft(0.012 - np.abs(Y - wall - 0.01 * np.sin(X * 9)), 0.004), 0.75)
    floor = style_depth * rng.uniform(0.86, 0.95)
    E = _paint(E, _soft(Y - floor + 0.03 * np.sin(X * 6 + 1), 0.01), 0.5)
    return E, np.zeros_like(X)


def _centre(rng):
    return rng.uniform(-0.12, 0.12), rng.uniform(0.48, 0.58)


def _spine(X, Y, E, B, cx, cy, r, angle, rng, scale=1.0):
    """Three ossification centres of a vertebra and the skin line behind them."""
    sx, sy = cx + 0.78 * r * math.sin(angle), cy + 0.78 * r * math.cos(angle)
    s = 0.022 * scale
    for ox, oy in ((0.0, 0.0), (-1.4, -1.6), (1.4, -1.6)):
        px = sx + s * (ox * math.cos(angle) + oy * math.sin(angle))
        py = sy + s * (-ox * math.sin(angle) + oy * math.cos(angle))
        blob = _ellipse(X, Y, px, py, s * 0.75, s * 0.75)
        E = _paint(E, blob, 1.0)
        B = np.maximum(B, blob)
    return E, B


def _brain(X, Y, rng):
    E, B = _background(X, Y, rng, 1.0)
    cx, cy = _centre(rng)
    a, b = rng.uniform(0.28, 0.33), rng.uniform(0.22, 0.26)
    ang = rng.uniform(-0.5, 0.5)
    inside = _ellipse(X, Y, cx, cy, a, b, ang)
    E = _paint(E, inside, 0.3 + 0.04 * np.sin(X * 40) * np.cos(Y * 35))
    # lateral ventricles (dark) with choroid plexus (bright) in the far hemisphere
    side = rng.choice([-1.0, 1.0])
    u0, v0 = 0.35 * a, side * 0.42 * b
    vx = cx + u0 * math.cos(ang) - v0 * math.sin(ang)
    vy = cy + u0 * math.sin(ang) + v0 * math.cos(ang)
    E = _paint(E, _ellipse(X, Y, vx, vy, 0.32 * a, 0.09 * b, ang), 0.05)
    E = _paint(E, _ellipse(X, Y, vx + 0.01, vy, 0.16 * a, 0.06 * b, ang), 0.8)
    # thalami: two hypoechoic ovals beside the midline
    for sgn in (-1, 1):
        tx = cx - 0.05 * a * math.cos(ang) - sgn * 0.16 * b * math.sin(ang)
        ty = cy - 0.05 * a * math.sin(ang) + sgn * 0.16 * b * math.cos(ang)
        E = _paint(E, _ellipse(X, Y, tx, ty, 0.17 * a, 0.12 * b, ang), 0.17)
    # midline echo, interrupted by the cavum septi pellucidi
    ux, uy = math.cos(ang), math.sin(ang)
    mid = _segment(
        X, Y, cx - 0.9 * a * ux, cy - 0.9 * a * uy, cx + 0.9 * a * ux, cy + 0.9 * a * uy, 0.008
    )
    E = _paint(E, mid, 0.82)
    csp_x, csp_y = cx - 0.42 * a * ux, cy - 0.42 * a * uy
    E = _paint(E, _ellipse(X, Y, csp_x, csp_y, 0.09 * a, 0.05 * b, ang), 0.02)
    # Sylvian fissures: short bright curves
    for sgn in (-1, 1):
        fx = cx + 0.1 * a * ux - sgn * 0.62 * b * uy
        fy = cy + 0.1 * a * uy + sgn * 0.62 * b * ux
        E = _paint(
            E,
            _segment(
                X,
                Y,
                fx - 0.15 * a * ux,
                fy - 0.15 * a * uy,
                fx + 0.15 * a * ux,
                fy + 0.15 * a * uy,
                0.01,
                bend=0.25 * sgn,
            ),
            0.55,
        )
    skull = _ring(X, Y, cx, cy, a, b, ang, rng.uniform(0.016, 0.024))
    E = _paint(E, skull, 1.0)
    B = np.maximum(B, skull * 0.35)
    return E, B


def _abdomen(X, Y, rng):
    E, B = _background(X, Y, rng, 1.0)
    cx, cy = _centre(rng)
    r = rng.uniform(0.23, 0.28)
    a, b = r * rng.uniform(1.0, 1.1), r
    ang = rng.uniform(-0.4, 0.4)
    body = _ellipse(X, Y, cx, cy, a, b, ang)
    texture = 0.06 * np.sin(X * 70 + rng.uniform(0, 6)) * np.sin(Y * 60)
    E = _paint(E, body, 0.5 + texture)
    E = _paint(E, _ring(X, Y, cx, cy, a, b, ang, 0.012), 0.68)  # skin
    # stomach bubble: anechoic, on one side
    side = rng.choice([-1.0, 1.0])
    theta = rng.uniform(-0.6, 0.2)
    sx = cx + side * 0.45 * a * math.cos(theta)
    sy = cy + 0.35 * b * math.sin(theta)
    E = _paint(E, _ellipse(X, Y, sx, sy, 0.3 * a, 0.2 * b, rng.uniform(-0.8, 0.8)), 0.0)
    # umbilical vein / portal sinus: a dark curved tube
    E = _paint(
        E,
        _segment(
            X,
            Y,
            cx - side * 0.35 * a,
            cy - 0.1 * b,
            cx + side * 0.1 * a,
            cy + 0.15 * b,
            0.02,
            bend=0.3,
        ),
        0.08,
    )
    # spine at the back, and short rib echoes on the sides
    spine_angle = rng.uniform(-0.6, 0.6) + (math.pi if rng.random() < 0.3 else 0.0)
    E, B = _spine(X, Y, E, B, cx, cy, r, spine_angle, rng)
    for sgn in (-1, 1):
        rx = cx + sgn * 0.88 * a
        ry = cy + rng.uniform(-0.1, 0.2) * b
        rib = _segment(X, Y, rx, ry - 0.04, rx + sgn * 0.01, ry + 0.04, 0.012)
        E = _paint(E, rib, 0.9)
        B = np.maximum(B, rib * 0.8)
    return E, B


def _femur(X, Y, rng):
    E, B = _background(X, Y, rng, 1.0)
    cx, cy = rng.uniform(-0.1, 0.1), rng.uniform(0.42, 0.55)
    ang = rng.uniform(-0.35, 0.35)
    length = rng.uniform(0.42, 0.58)
    thigh = _ellipse(X, Y, cx, cy + 0.02, length * 0.62, rng.uniform(0.09, 0.13), ang)
    E = _paint(E, thigh, 0.42 + 0.05 * np.sin(X * 55) * np.sin(Y * 45))
    ux, uy = math.cos(ang), math.sin(ang)
    x0, y0 = cx - length / 2 * ux, cy - length / 2 * uy
    x1, y1 = cx + length / 2 * ux, cy + length / 2 * uy
    bone = _segment(X, Y, x0, y0, x1, y1, rng.uniform(0.018, 0.026), bend=rng.uniform(-0.06, 0.02))
    for ex, ey in ((x0, y0), (x1, y1)):  # wider metaphyses
        bone = np.maximum(bone, _ellipse(X, Y, ex, ey, 0.022, 0.016, ang))
    E = _paint(E, bone, 1.0)
    B = np.maximum(B, bone)
    # a second, out-of-plane limb section sometimes
    if rng.random() < 0.5:
        ox, oy = rng.uniform(-0.3, 0.3), rng.uniform(0.65, 0.8)
        E = _paint(E, _ellipse(X, Y, ox, oy, 0.07, 0.05, rng.uniform(0, 3)), 0.42)
    return E, B


def _thorax(X, Y, rng):
    E, B = _background(X, Y, rng, 1.0)
    cx, cy = _centre(rng)
    r = rng.uniform(0.22, 0.27)
    a, b = r * rng.uniform(1.0, 1.08), r
    ang = rng.uniform(-0.4, 0.4)
    E = _paint(E, _ellipse(X, Y, cx, cy, a, b, ang), 0.6 + 0.04 * np.sin(X * 80) * np.sin(Y * 70))
    E = _paint(E, _ring(X, Y, cx, cy, a, b, ang, 0.012), 0.7)
    # four-chamber heart, apex to one side
    side = rng.choice([-1.0, 1.0])
    hx, hy = cx + side * 0.22 * a, cy - 0.12 * b
    hang = ang + side * 0.7
    ha, hb = 0.5 * a, 0.4 * b
    E = _paint(E, _ellipse(X, Y, hx, hy, ha, hb, hang), 0.45)
    hux, huy = math.cos(hang), math.sin(hang)
    for su in (-1, 1):
        for sv in (-1, 1):
            px = hx + su * 0.42 * ha * hux - sv * 0.42 * hb * huy
            py = hy + su * 0.42 * ha * huy + sv * 0.42 * hb * hux
            E = _paint(E, _ellipse(X, Y, px, py, 0.36 * ha, 0.33 * hb, hang), 0.02)
    # descending aorta (dark circle) in front of the spine
    spine_angle = rng.uniform(-0.5, 0.5)
    ax = cx + 0.55 * r * math.sin(spine_angle) - side * 0.1 * r
    ay = cy + 0.55 * r * math.cos(spine_angle)
    E = _paint(E, _ellipse(X, Y, ax, ay, 0.05 * r, 0.05 * r), 0.03)
    E, B = _spine(X, Y, E, B, cx, cy, r, spine_angle, rng)
    # ribs: bright arcs around the chest, each casting a shadow
    for k in range(int(rng.integers(4, 7))):
        t = -math.pi / 2 + (k + rng.uniform(-0.2, 0.2)) * math.pi / 3
        rx, ry = cx + 0.95 * a * math.cos(t), cy + 0.95 * b * math.sin(t)
        rib = _segment(
            X,
            Y,
            rx - 0.025 * math.sin(t),
            ry + 0.025 * math.cos(t),
            rx + 0.025 * math.sin(t),
            ry - 0.025 * math.cos(t),
            0.014,
        )
        E = _paint(E, rib, 0.95)
        B = np.maximum(B, rib * 0.8)
    return E, B


def _other(X, Y, rng):
    E, B = _background(X, Y, rng, 1.0)
    # placenta: a thick granular band at a random depth and tilt
    if rng.random() < 0.7:
        y0, tilt = rng.uniform(0.25, 0.6), rng.uniform(-0.4, 0.4)
        thick = rng.uniform(0.08, 0.18)
        d = Y - (y0 + tilt * X)
        band = _soft(thick / 2 - np.abs(d), 0.01)
        grain = 0.62 + 0.08 * np.sin(X * 90 + Y * 30) * np.sin(Y * 110)
        E = _paint(E, band, grain)
    # umbilical cord: cluster of dark vessels with bright walls
    for _ in range(int(rng.integers(0, 3))):
        ux, uy = rng.uniform(-0.3, 0.3), rng.uniform(0.35, 0.8)
        for k in range(3):
            px, py = ux + 0.03 * math.cos(k * 2.1), uy + 0.03 * math.sin(k * 2.1)
            E = _paint(E, _ellipse(X, Y, px, py, 0.028, 0.022), 0.62)
            E = _paint(E, _ellipse(X, Y, px, py, 0.018, 0.014), 0.03)
    # fetal parts cut obliquely: soft-tissue ovals, sometimes with a bone echo
    for _ in range(int(rng.integers(1, 4))):
        ox, oy = rng.uniform(-0.35, 0.35), rng.uniform(0.3, 0.8)
        oa, ob = rng.uniform(0.05, 0.16), rng.uniform(0.04, 0.1)
        oang = rng.uniform(0, math.pi)
        E = _paint(E, _ellipse(X, Y, ox, oy, oa, ob, oang), rng.uniform(0.35, 0.55))
        if rng.random() < 0.4:
            bone = _segment(X, Y, ox - 0.5 * oa, oy, ox + 0.5 * oa, oy + 0.01, 0.012)
            E = _paint(E, bone, 0.9)
            B = np.maximum(B, bone * 0.6)
    return E, B


_ANATOMY = {
    "brain": _brain,
    "abdomen": _abdomen,
    "femur": _femur,
    "thorax": _thorax,
    "other": _other,
}


# --------------------------------------------------------------------------------------------
# Image formation
# --------------------------------------------------------------------------------------------
def _jitter(rng, value, rel):
    return value * (1.0 + rng.uniform(-rel, rel))


def render(
    plane: str,
    domain: str = "source",
    seed: int = 0,
    index: int = 0,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Render one phantom image.

    Args:
        plane: One of :data:`PHANTOM_PLANES`.
        domain: ``source`` or ``target`` (the machine that "scanned" it).
        seed: Dataset seed.
        index: Image index within (domain, plane).
        size: (height, width); default the domain's screen size.

    Returns:
        uint8 array (H, W), grayscale.
    """
    if plane not in _ANATOMY:
        raise DataError(f"the phantom draws {', '.join(_ANATOMY)}; not {plane!r}")
    if domain not in STYLES:
        raise DataError(f"phantom domain must be source or target, not {domain!r}")
    style = STYLES[domain]
    rng = np.random.default_rng([seed, DOMAINS.index(domain), PHANTOM_PLANES.index(plane), index])
    return form_image(plane, style, rng, size or style.size)


def form_image(
    plane: str, style: ScannerStyle, rng: np.random.Generator, size: tuple[int, int]
) -> np.ndarray:
    """Scan ``plane``'s anatomy with machine ``style``; every random draw comes from ``rng``.

    Args:
        plane: One of :data:`PHANTOM_PLANES`.
        style: The machine.
        rng: The image's random generator (anatomy, jitter, speckle, noise, text).
        size: (height, width) of the screen.

    Returns:
        uint8 array (H, W), grayscale.
    """
    height, width = size
    half = math.radians(_jitter(rng, style.half_angle_deg, 0.08))
    depth = _jitter(rng, style.depth, 0.04)
    apex = style.apex + rng.uniform(-0.015, 0.015)
    # Polar grid: rows along the beam (depth), columns across the sector.
    n_r, n_t = max(64, int(height * 1.2)), max(64, int(width * 0.8))
    r = np.linspace(0.0, depth - apex, n_r)[:, None]
    t = np.linspace(-half, half, n_t)[None, :]
    X = r * np.sin(t)  # (n_r, n_t) by broadcasting
    Y = apex + r * np.cos(t)
    echo, bone = _ANATOMY[plane](X, Y, rng)
    if style.blur:
        echo = ndimage.gaussian_filter(echo, (0.3, style.blur))
    # Correlated complex Gaussian scatter -> Rayleigh speckle of unit mean square.
    sigma = tuple(_jitter(rng, s, 0.1) for s in style.speckle_sigma)
    scatter = ndimage.gaussian_filter(rng.standard_normal((n_r, n_t)), sigma) + 1j * (
        ndimage.gaussian_filter(rng.standard_normal((n_r, n_t)), sigma)
    )
    speckle = np.abs(scatter)
    speckle /= np.sqrt(np.mean(speckle**2)) + 1e-12
    # The echo map holds display levels (0 black .. 1 brightest); as amplitudes they span a
    # nominal 50 dB. Speckle, shadowing, attenuation and noise act on amplitudes, then the
    # machine's own dynamic range and gain map them back to grey levels.
    amplitude = 10.0 ** ((echo - 1.0) * 50.0 / 20.0)
    dr = (depth - apex) / n_r
    shadow = np.exp(-np.cumsum(bone, axis=0) * dr * 100.0)
    shadow = ndimage.gaussian_filter(shadow, (0.0, 1.0))
    attenuation = np.exp(-_jitter(rng, style.attenuation, 0.15) * r)
    noise = 10.0 ** (style.noise_db / 20.0) * np.abs(rng.standard_normal((n_r, n_t)))
    intensity = amplitude * speckle * shadow * attenuation + noise
    db = 20.0 * np.log10(intensity + 1e-9) + style.gain_db + rng.uniform(-2.0, 2.0)
    dynamic_range = _jitter(rng, style.dynamic_range_db, 0.06)
    bmode = np.clip(1.0 + db / dynamic_range, 0.0, 1.0) ** style.gamma
    # Scan conversion: every screen pixel looks up its (depth, angle) in the polar image.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    px = (xx - (width - 1) / 2) / height
    py = yy / height - apex
    rr = np.sqrt(px**2 + py**2)
    tt = np.arctan2(px, py)
    rows = rr / (depth - apex) * (n_r - 1)
    cols = (tt + half) / (2 * half) * (n_t - 1)
    screen = ndimage.map_coordinates(bmode, [rows, cols], order=1, mode="constant", cval=0.0)
    near = 0.06 - apex  # the probe's footprint: nothing is imaged closer than this
    inside = (
        _soft(half - np.abs(tt), 0.6 / height / max(rr.mean(), 1e-3))
        * _soft((depth - apex) - rr, 0.6 / height)
        * _soft(rr - near, 0.6 / height)
    )
    image = (np.clip(screen * inside, 0.0, 1.0) * 255).round().astype(np.uint8)
    return _annotate(image, style, rng)


def _annotate(image: np.ndarray, style: ScannerStyle, rng: np.random.Generator) -> np.ndarray:
    """Depth ticks on every machine; text and a grey bar on machines that show them."""
    img = Image.fromarray(image, "L")
    draw = ImageDraw.Draw(img)
    h, w = image.shape
    tick_x = w - 6 if not style.text else 4
    for k in range(1, 8):
        y = int(k * h / 8)
        draw.line([(tick_x, y), (tick_x + 2, y)], fill=170)
    if style.text:
        font = ImageFont.load_default()
        lines = [
            f"MI {rng.uniform(0.6, 1.3):.1f}  TIs {rng.uniform(0.1, 0.6):.1f}",
            f"C5-2  {int(rng.integers(18, 32))}Hz",
            f"G{int(rng.integers(40, 70))} D{rng.uniform(11, 17):.1f}",
        ]
        for k, line in enumerate(lines):
            draw.text((6, 4 + 12 * k), line, fill=215, font=font)
        for y in range(h // 4, 3 * h // 4):  # grey-map bar
            value = int(255 * (3 * h // 4 - y) / (h // 2))
            draw.line([(w - 10, y), (w - 5, y)], fill=value)
    return np.asarray(img)


def _render_all(jobs: list[tuple]) -> Iterator[np.ndarray]:
    """``render(*job)`` for every job, in order, on a few threads.

    numpy and scipy release the GIL in their array loops, and every image draws from a
    generator of its own, so the images are the same as one after another: 100 images took
    2.8 s on 2 threads instead of 4.6 s on a 2-core AMD EPYC.
    """
    threads = min(4, os.cpu_count() or 1)
    if threads == 1 or len(jobs) < 2:
        yield from (render(*job) for job in jobs)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="fulora-phantom") as pool:
        yield from pool.map(lambda job: render(*job), jobs)


def _image_path(out: Path, plane: str, domain: str, index: int) -> Path:
    """Where :func:`generate_phantom` writes an image (and :func:`phantom_grid` reads it)."""
    return out / plane / f"{domain}-{index:05d}.png"


def generate_phantom(out: str | Path, config: PhantomConfig) -> Manifest:
    """Write a phantom dataset: ``out/<plane>/<domain>-<index>.png``, captions, manifest, grid.

    Images already present are kept (the output is deterministic), so an interrupted run
    resumes. Each plane folder gets the paper's caption file, so ``out`` is also a LoRA
    training folder.

    Returns:
        The manifest (also written to ``out/manifest.csv``).
    """
    out = Path(out)
    planes = check_planes(config.planes)  # canonical names; PhantomConfig refused any other
    domains = list(DOMAINS) if config.domain == "both" else [config.domain]
    jobs = [(d, p, i) for d in domains for p in planes for i in range(config.per_class)]
    paths = [_image_path(out, plane, domain, index) for domain, plane, index in jobs]
    missing = [(job, path) for job, path in zip(jobs, paths, strict=True) if not path.is_file()]
    # closed on any error or Ctrl-C, which cancels the renders not yet started
    with closing(
        _render_all([(p, d, config.seed, i, config.size) for (d, p, i), _ in missing])
    ) as rendered:
        for (_, path), array in tqdm(
            zip(missing, rendered, strict=True),
            total=len(missing),
            desc="phantom images",
            unit="img",
        ):
            with atomic_path(path) as tmp:
                Image.fromarray(array, "L").save(tmp, format="PNG")
    records = []
    for (domain, plane, index), path in zip(jobs, paths, strict=True):
        records.append(
            {
                "path": str(path.resolve()),
                "label": plane,
                "split": "",
                "source": "phantom",
                "domain": f"phantom-{domain}",
                "patient": f"{domain}-{index:05d}",
                "caption": PAPER_CAPTIONS[plane],
                "seed": config.seed,
                "index": index,
            }
        )
    for plane in planes:
        write_text(out / plane / "duplicate_text_for_each_image.txt", PAPER_CAPTIONS[plane] + "\n")
    manifest = Manifest.from_records(records, origin=str(out / MANIFEST_NAME))
    manifest.write(out / MANIFEST_NAME)
    if config.grid:
        phantom_grid(
            out / "grid.png",
            planes=planes,
            domains=domains,
            seed=config.seed,
            per_row=min(4, config.per_class),
            size=config.size,
            folder=out,
        )
    logger.info("phantom: %d images (%d new) in %s", len(records), len(missing), out)
    return manifest


def _read_grey(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


def phantom_grid(
    path: str | Path,
    planes: Sequence[str] = PHANTOM_PLANES,
    domains: Sequence[str] = DOMAINS,
    seed: int = 0,
    per_row: int = 4,
    size: tuple[int, int] | None = None,
    folder: Path | None = None,
) -> Path:
    """A labelled grid PNG: one row per plane, ``per_row`` images per domain side by side.

    ``folder``: a :func:`generate_phantom` folder of these settings to read the images from
    instead of rendering them again.
    """
    jobs = [(plane, d, seed, i, size) for plane in planes for d in domains for i in range(per_row)]
    if folder is None:
        images = list(_render_all(jobs))
    else:
        images = [_read_grey(_image_path(folder, p, d, i)) for p, d, _, i, _ in jobs]
    width = len(domains) * per_row
    rows = [images[k : k + width] for k in range(0, len(images), width)]
    row_labels = list(planes)
    col_labels = [f"{d} #{i}" for d in domains for i in range(per_row)]
    return image_grid(
        path,
        rows,
        row_labels=row_labels,
        col_labels=col_labels,
        title=f"fulora phantom (seed {seed}): " + " | ".join(domains),
    )
