"""Shard inspection: read every shard as training does, count shards and samples, find the unusable ones, write
a preview grid (`python -m dcgan_dist.data inspect`, whose printing is in cli/data.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcgan_dist.data.images import save_grid
from dcgan_dist.data.shards import (
    decode_label,
    decode_sample,
    expand_shards,
    iter_samples,
    read_classes,
    read_info,
    shard_counts,
)

# Unusable samples named one by one on stderr; the rest are counted.
SHOWN_BAD_SAMPLES = 5


def inspect(spec: str, preview: str | None = None, preview_count: int = 64) -> dict:
    """Read every shard as training does: count shards and samples, decode every image (its mode converted as
    the loader does), and count as unusable those that do not decode or differ in size or channels from
    dataset.json's (or, without it, from most of the images); compare each shard's count with dataset.json's;
    write a preview grid. `errors` lists every unreadable or short shard by name, `bad_by_shard` the shards
    with unusable samples. A labelled set (dataset.json's classes): `classes` and `class_counts` ({name: samples
    read}, every class listed), and the samples without a usable label count as unusable; otherwise both None."""
    urls = expand_shards(spec)
    info = read_info(spec)
    classes = read_classes(spec)
    labels: Counter = Counter()
    expected, missing = shard_counts(spec)
    arrays: dict[str, list] = {}  # url -> [(key, shape)] of its decodable samples
    formats: Counter = Counter()
    bad_by_shard: Counter = Counter()
    first: list[np.ndarray] = []
    errors: list[str] = []
    reasons: list[str] = []
    for url in urls:
        read, decoded = 0, []
        failure: list[Exception] = []

        def keep_going(exc: Exception, failure: list = failure) -> bool:  # this shard's list
            failure.append(exc)
            return True

        for sample in iter_samples([url], handler=keep_going):
            read += 1
            try:
                array = decode_sample(sample)
                if classes is not None:
                    label = decode_label(sample)
                    if label is None or label >= len(classes):
                        raise ValueError(
                            f"sample '{sample['__key__']}' in {url} has "
                            f"{'no label' if label is None else f'label {label}'}, dataset.json has "
                            f"{len(classes)} classes"
                        )
                    labels[label] += 1
            except ValueError as exc:
                bad_by_shard[url] += 1
                reasons.append(str(exc))
                continue
            decoded.append((sample["__key__"], array.shape))
            formats[next((k for k in ("raw", "png", "jpg", "jpeg") if k in sample), "?")] += 1
            if len(first) < preview_count:
                first.append(array)
        arrays[url] = decoded
        name, want = Path(url).name, expected.get(url)
        if failure:
            errors.append(f"{name}: unreadable after {read} sample(s): {str(failure[0]).splitlines()[0][:200]}")
        elif want is not None and read < want:
            errors.append(f"{name}: {read} samples, dataset.json says {want} (truncated?)")
    errors += [f"{Path(path).name}: missing, dataset.json lists it ({expected[path]} samples)" for path in missing]
    shapes = Counter(shape for decoded in arrays.values() for _, shape in decoded)
    # What the set should hold: dataset.json's shape, else that of most images; the others are unusable.
    want_shape: tuple[int, int, int] | None
    if info:
        want_shape = (info.image_size, info.image_size, info.channels)
    else:
        want_shape = shapes.most_common(1)[0][0] if shapes else None
    for url, decoded in arrays.items():
        for key, shape in decoded:
            if want_shape is not None and shape != want_shape:  # None only when nothing decoded
                bad_by_shard[url] += 1
                reasons.append(
                    f"sample '{key}' in {url}: {shape[0]}x{shape[1]} with {shape[2]} channel(s), the set "
                    f"holds {want_shape[0]}x{want_shape[1]} with {want_shape[2]}" + (" (dataset.json)" if info else "")
                )
    report: dict[str, Any] = {
        "shards": len(urls),
        "samples": sum(shapes.values()),
        "expected_samples": info.num_samples if info else None,
        "has_dataset_json": info is not None,
        "image_shapes": {f"{h}x{w}x{c}": n for (h, w, c), n in shapes.items()},
        "formats": dict(formats),
        "bad_samples": sum(bad_by_shard.values()),
        "bad_by_shard": {Path(url).name: n for url, n in bad_by_shard.items()},
        "first_bad": reasons[:SHOWN_BAD_SAMPLES],
        "errors": errors,
        "classes": classes,
        "class_counts": {name: labels[i] for i, name in enumerate(classes)} if classes is not None else None,
    }
    usable = [a for a in first if a.shape == want_shape]
    if usable and preview:
        grid = torch.from_numpy(np.stack(usable)).permute(0, 3, 1, 2)
        report["preview"] = str(save_grid(grid, preview))
    return report


def default_preview(shards: str) -> str | None:
    """Where inspect puts its preview without --preview: beside the shards (a local folder, or the folder of a
    local glob or brace pattern), never the current directory; a URL or s3:// location gets none."""
    if "://" in shards or shards.startswith("pipe:"):
        return None
    path = Path(shards).expanduser()
    folder = path if path.is_dir() else path.parent
    if not folder.is_dir() or any(ch in str(folder) for ch in "*?[{"):
        return None
    return str(folder / "preview.png")
