"""Procedurally drawn faces: the embedded default data set.

No real face data set can be downloaded everywhere this project runs (CI, air-gapped clusters), so the
default data set is drawn: background, hair, face oval, skin tone, eyes with irises, brows, nose and mouth,
with random pose (shift, tilt, scale), colours and expression. Face `i` of seed `s` is the same image
whichever shard or process draws it, so sets are reproducible and can be generated in parallel.

Labels (`data synth --labels NAME`): a class per face from an attribute the drawing already draws (LABELS), so
a labelled set holds the very images of the unlabelled one with the same seed.
"""

from __future__ import annotations

import fcntl
import math
import multiprocessing as mp
import os
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from dcgan_dist.data.shards import META_FILE, SHARD_PATTERN, DatasetInfo, ShardOutput, ShardTar, check_format
from dcgan_dist.stopping import raise_on_signals

SUPERSAMPLE = 4  # draw at 4x and downsample with a box filter for smooth, anti-aliased edges

SKIN_TONES = [(255, 224, 196), (241, 194, 155), (224, 172, 125), (198, 134, 90), (161, 102, 64), (109, 68, 44)]
HAIR_COLOURS = [
    (20, 16, 14),
    (60, 40, 26),
    (110, 74, 44),
    (176, 130, 78),
    (222, 190, 130),
    (150, 60, 30),
    (170, 170, 170),
]
IRIS_COLOURS = [(70, 45, 25), (40, 90, 150), (60, 120, 70), (110, 90, 60), (30, 30, 30)]
HAIR_STYLES = ("short", "long", "none")  # hair_style 0, 1, 2 (bald-ish)

# `data synth --labels NAME`: the class names and the class of a face from its drawn attributes. Both are visible
# at 32x32: skin is the tone of the face oval (the largest area after the background; SKIN_TONES in pairs, light
# to dark), hair the silhouette of the hair (short, long past the jaw, none). Skin gives the most distinct classes
# (README: a nearest-class-mean check tells them apart best).
LABELS: dict[str, tuple[tuple[str, ...], str]] = {
    "skin": (("light", "medium", "dark"), "skin tone, SKIN_TONES 0-1, 2-3, 4-5"),
    "hair": (HAIR_STYLES, "hair style: short, long (past the jaw), none"),
}


def face_label(labels: str, attributes: dict) -> int:
    """The class of a face with these drawn attributes under labelling `labels` (a key of LABELS)."""
    if labels == "skin":
        return attributes["skin"] // 2
    if labels == "hair":
        return attributes["hair_style"]
    raise ValueError(f"unknown labels '{labels}': one of {', '.join(LABELS)}")


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in colour)  # type: ignore[return-value]


def _rotate(points, centre, angle):
    cx, cy = centre
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * ca - (y - cy) * sa, cy + (x - cx) * sa + (y - cy) * ca) for x, y in points]


def _ellipse(cx, cy, rx, ry, angle=0.0, n=48):
    pts = [(cx + rx * math.cos(2 * math.pi * k / n), cy + ry * math.sin(2 * math.pi * k / n)) for k in range(n)]
    return _rotate(pts, (cx, cy), angle) if angle else pts


def draw_face(index: int, seed: int = 0, size: int = 64) -> Image.Image:
    """Face number `index` of the set with this `seed`, as an RGB image of size x size."""
    return draw_face_with_attributes(index, seed, size)[0]


def draw_face_with_attributes(index: int, seed: int = 0, size: int = 64) -> tuple[Image.Image, dict]:
    """draw_face, and the attributes it drew: skin and hair (indices into SKIN_TONES, HAIR_COLOURS), hair_style
    (an index into HAIR_STYLES)."""
    rng = np.random.default_rng([seed, index])
    s = size * SUPERSAMPLE
    u = s / 64.0  # drawing unit: the layout below is in 64x64 coordinates

    # Background: a vertical gradient between two random colours.
    top, bottom = rng.integers(20, 236, 3), rng.integers(20, 236, 3)
    t = np.linspace(0.0, 1.0, s)[:, None, None]
    bg = (top * (1 - t) + bottom * t).repeat(s, axis=1).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)

    # Pose: centre shift, head tilt and scale.
    cx = s / 2 + rng.normal(0, 2.5) * u
    cy = s / 2 + rng.normal(1.5, 2.0) * u
    tilt = rng.normal(0, 0.12)
    k = u * rng.uniform(0.85, 1.1)
    face_rx, face_ry = rng.uniform(15, 19) * k, rng.uniform(19, 23) * k

    skin_index = int(rng.integers(len(SKIN_TONES)))
    skin = _jitter(rng, SKIN_TONES[skin_index], 8)
    hair_index = int(rng.integers(len(HAIR_COLOURS)))
    hair = _jitter(rng, HAIR_COLOURS[hair_index], 10)
    hair_style = int(rng.integers(3))  # 0 short, 1 long, 2 bald-ish
    attributes = {"skin": skin_index, "hair": hair_index, "hair_style": hair_style}

    def rot(points):
        return _rotate(points, (cx, cy), tilt)

    # Hair behind the head (long hair reaches down past the jaw).
    if hair_style != 2:
        hair_ry = face_ry * (1.45 if hair_style == 1 else 1.12)
        hair_cy = cy + (face_ry * 0.35 if hair_style == 1 else -face_ry * 0.05)
        draw.polygon(rot(_ellipse(cx, hair_cy, face_rx * 1.22, hair_ry)), fill=hair)
    # Neck and shoulders.
    neck = [(cx - 6 * k, cy + face_ry * 0.7), (cx + 6 * k, cy + face_ry * 0.7), (cx + 7 * k, s), (cx - 7 * k, s)]
    draw.polygon(rot(neck), fill=_jitter(rng, skin, 4))
    shirt = tuple(int(c) for c in rng.integers(0, 256, 3))
    draw.polygon(rot(_ellipse(cx, cy + face_ry * 1.9, face_rx * 2.2, face_ry * 0.8)), fill=shirt)
    # Ears, then the face oval.
    for side in (-1, 1):
        draw.polygon(rot(_ellipse(cx + side * face_rx * 0.98, cy + 1 * k, 3 * k, 5 * k)), fill=skin)
    draw.polygon(rot(_ellipse(cx, cy, face_rx, face_ry)), fill=skin)
    # Fringe over the forehead.
    if hair_style != 2:
        fringe_depth = rng.uniform(0.25, 0.55)
        pts = _ellipse(cx, cy - face_ry * 0.75, face_rx * 1.05, face_ry * fringe_depth)
        draw.polygon(rot(pts), fill=hair)

    # Eyes: white, iris, pupil; a little gaze shift and blink.
    eye_dx, eye_y = rng.uniform(6.0, 8.0) * k, cy - rng.uniform(1.0, 4.0) * k
    eye_rx, eye_ry = rng.uniform(2.6, 3.6) * k, rng.uniform(1.4, 2.4) * k * rng.choice([1.0, 1.0, 1.0, 0.5])
    iris = _jitter(rng, IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))], 10)
    gaze = rng.normal(0, 0.6) * k
    for side in (-1, 1):
        ex = cx + side * eye_dx
        draw.polygon(rot(_ellipse(ex, eye_y, eye_rx, eye_ry)), fill=(245, 245, 240))
        r_iris = min(eye_rx, eye_ry) * 0.95
        draw.polygon(rot(_ellipse(ex + gaze, eye_y, r_iris, r_iris, n=24)), fill=iris)
        draw.polygon(rot(_ellipse(ex + gaze, eye_y, r_iris * 0.45, r_iris * 0.45, n=16)), fill=(10, 10, 10))

    # Brows: their angle carries the expression (raised, neutral, frowning).
    brow_raise = rng.normal(0, 1.0) * k
    brow_angle = rng.normal(0, 0.15)
    brow_colour = tuple(int(c * 0.8) for c in hair) if hair_style != 2 else (60, 45, 35)
    for side in (-1, 1):
        bx, by = cx + side * eye_dx, eye_y - 4.2 * k - brow_raise
        half = eye_rx * 1.2
        a = side * brow_angle
        p0 = (bx - half * math.cos(a), by - half * math.sin(a))
        p1 = (bx + half * math.cos(a), by + half * math.sin(a))
        draw.line(rot([p0, p1]), fill=brow_colour, width=max(1, int(1.3 * k)))

    # Nose: a shaded wedge.
    nose_len = rng.uniform(5, 8) * k
    nose_colour = tuple(int(c * 0.8) for c in skin)
    nose = [(cx, eye_y + 1 * k), (cx - 2.2 * k, eye_y + nose_len), (cx + 2.2 * k, eye_y + nose_len)]
    draw.polygon(rot(nose), fill=nose_colour)

    # Mouth: smile, neutral, frown or open.
    mouth_y = cy + rng.uniform(9, 12) * k
    mouth_w = rng.uniform(4, 7) * k
    curve = rng.normal(0.5, 0.7) * k * 2.5  # > 0 smile, < 0 frown
    lips = _jitter(rng, (170, 70, 70), 20)
    if rng.random() < 0.2:  # open mouth
        draw.polygon(rot(_ellipse(cx, mouth_y, mouth_w * 0.7, 2.2 * k)), fill=(60, 20, 25))
    else:
        pts = [(cx + mouth_w * x, mouth_y - curve * x * x) for x in np.linspace(-1, 1, 9)]  # corners up = smile
        draw.line(rot(pts), fill=lips, width=max(1, int(1.6 * k)))

    img = img.filter(ImageFilter.GaussianBlur(radius=0.6 * SUPERSAMPLE))
    return img.resize((size, size), Image.Resampling.BOX), attributes


def face_array(index: int, seed: int, size: int, channels: int) -> np.ndarray:
    return face_array_with_attributes(index, seed, size, channels)[0]


def face_array_with_attributes(index: int, seed: int, size: int, channels: int) -> tuple[np.ndarray, dict]:
    image, attributes = draw_face_with_attributes(index, seed, size)
    if channels == 1:
        return np.asarray(image.convert("L"))[:, :, None], attributes
    return np.asarray(image), attributes


def _write_shard(args: tuple[str, int, int, int, int, int, str, str | None]) -> tuple[str, int, list[int]]:
    """One shard of faces start..stop-1 -> (its file name, faces, faces per class of `labels` or [])."""
    path, start, stop, seed, size, channels, fmt, labels = args
    per_class = [0] * len(LABELS[labels][0]) if labels else []
    with ShardTar(path, fmt) as shard:
        for i in range(start, stop):
            array, attributes = face_array_with_attributes(i, seed, size, channels)
            label = face_label(labels, attributes) if labels else None
            if label is not None:
                per_class[label] += 1
            shard.write(i, array, label)
    return Path(path).name, stop - start, per_class


def _drawing_process_init() -> None:
    # Ctrl-C reaches the whole process group: the parent decides (it stops the pool and removes the shards),
    # so a drawing process must not die first with a KeyboardInterrupt traceback. SIGTERM stays fatal (silent).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity: a taskset, a container's cpuset), not the machine's."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # no sched_getaffinity on macOS
        return os.cpu_count() or 1


# Without a terminal (CI, nohup, Ray job logs) the drawing says how far it is in a line this often.
PROGRESS_LINE_S = 5.0


def write_synthetic_shards(
    out_dir: str | Path,
    num: int,
    shard_size: int = 1000,
    size: int = 64,
    seed: int = 0,
    channels: int = 3,
    fmt: str = "png",
    processes: int | None = None,
    progress: bool = True,
    labels: str | None = None,
) -> DatasetInfo:
    """Draw `num` faces into shards of `shard_size` in `out_dir` (a folder or s3://bucket/prefix), shards drawn in
    parallel processes. fmt: png, jpg or raw. labels: a key of LABELS (each face labelled with its class), or
    None (unlabelled). SIGTERM or SIGINT stops it (stopping.StoppedBySignal) with the
    drawing processes ended and every shard it wrote removed; so does any error."""
    check_format(fmt)
    if labels is not None and labels not in LABELS:
        raise ValueError(f"unknown labels '{labels}': one of {', '.join(LABELS)}")
    classes = list(LABELS[labels][0]) if labels else []
    out = ShardOutput(str(out_dir))
    jobs = [
        (str(out.staging / (SHARD_PATTERN % j)), start, min(start + shard_size, num), seed, size, channels, fmt, labels)
        for j, start in enumerate(range(0, num, shard_size))
    ]
    per_class = [0] * len(classes)
    processes = processes or min(len(jobs), available_cpus())
    bar = tqdm(
        total=num, unit="img", desc=f"drawing faces -> {out_dir}", disable=None if progress else True
    )  # None: only on a terminal
    lines = progress and bar.disable  # no bar (no terminal): plain lines instead
    started = last_line = time.monotonic()
    counts = {}
    try:
        with raise_on_signals():
            pool_context = (
                mp.get_context("spawn").Pool(processes, initializer=_drawing_process_init)
                if processes > 1
                else nullcontext()
            )
            with pool_context as pool:  # leaving it (a stop, an error) terminates the drawing processes
                for name, n, shard_classes in (
                    pool.imap_unordered(_write_shard, jobs) if pool else map(_write_shard, jobs)
                ):
                    out.finished(name)
                    counts[name] = n
                    per_class = [a + b for a, b in zip(per_class, shard_classes)]
                    bar.update(n)
                    now = time.monotonic()
                    if lines and now - last_line >= PROGRESS_LINE_S and len(counts) < len(jobs):
                        done = sum(counts.values())
                        left = (num - done) * (now - started) / done
                        print(f"drawing faces: {done}/{num} ({100 * done / num:.0f}%), ~{left:.0f} s left", flush=True)
                        last_line = now
    except BaseException:
        bar.close()
        out.discard(Path(job[0]).name for job in jobs)
        raise
    bar.close()
    info = DatasetInfo(
        num,
        size,
        channels,
        fmt,
        len(jobs),
        source=f"synthetic faces, seed {seed}" + (f", labels: {labels} ({LABELS[labels][1]})" if labels else ""),
        shard_counts=dict(sorted(counts.items())),
        classes=classes,
        class_counts=dict(zip(classes, per_class)),
    )
    out.close(info)
    return info


def ensure_synthetic(cache_dir: str, num: int, size: int, channels: int, seed: int = 0) -> Path:
    """The embedded synthetic set for this size/channels, generated once into `cache_dir` and reused.

    Safe when several processes (Ray workers on one node) ask at once: one draws, the others wait on a lock;
    the set appears under its final name only when complete.
    """
    root = Path(os.path.expanduser(cache_dir))
    root.mkdir(parents=True, exist_ok=True)
    name = f"synth-faces-{size}px-{'rgb' if channels == 3 else 'grey'}-n{num}-seed{seed}"
    final = root / name
    if (final / META_FILE).is_file():
        return final
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / META_FILE).is_file():
            print(
                f"Generating the embedded synthetic face set ({num} images, {size}x{size}) in {final} (once)",
                flush=True,
            )
            for stale in root.glob(f".{name}.tmp-*"):  # left by a process killed while drawing (this lock is free)
                shutil.rmtree(stale, ignore_errors=True)
            tmp = root / f".{name}.tmp-{os.getpid()}"
            shard_size = max(50, min(1000, num // 64 or 1))  # enough shards to split across many workers
            started = time.monotonic()
            try:
                write_synthetic_shards(tmp, num, shard_size, size, seed, channels)
            except BaseException:  # a stop or an error: nothing half-drawn stays behind
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            print(f"Generated {num} faces in {time.monotonic() - started:.1f} s (reused from now on)", flush=True)
    return final
