"""Shard tools.

    python -m dcgan_dist.data synth --out data/faces --num 20000 --size 64
    python -m dcgan_dist.data convert --src img_align_celeba --out img_align_celeba-shards --size 64
    python -m dcgan_dist.data inspect data/faces     # exits 1 when a shard is unreadable or short

`<command> --help` lists each command's options. They describe the shards written or read, not a run: these
commands take no --config or key=value settings; where an option and a setting mean the same, the option's
default is the setting's in the schema (synth --num: data.synth_num, --size: model.image_size, --channels:
model.channels).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcgan_dist.cli import args as cli
from dcgan_dist.config import DataSection, ModelSection, allowed_values
from dcgan_dist.data.convert import convert
from dcgan_dist.data.images import save_grid
from dcgan_dist.data.shards import FORMATS, decode_sample, expand_shards, iter_samples, read_info, shard_counts
from dcgan_dist.data.synth import write_synthetic_shards
from dcgan_dist.errors import RunError
from dcgan_dist.stopping import StoppedBySignal

FORMAT_HELP = (
    "png (default: lossless, smallest), jpg (lossy), or raw (uint8 arrays: no decoding, the fastest "
    "loader, larger on disk); the loader reads any of them without a flag"
)

# Unusable samples named one by one on stderr; the rest are counted.
SHOWN_BAD_SAMPLES = 5


def inspect(spec: str, preview: str | None = None, preview_count: int = 64) -> dict:
    """Read every shard as training does: count shards and samples, decode every image (its mode converted as
    the loader does), and count as unusable those that do not decode or differ in size or channels from
    dataset.json's (or, without it, from most of the images); compare each shard's count with dataset.json's;
    write a preview grid. `errors` lists every unreadable or short shard by name, `bad_by_shard` the shards
    with unusable samples."""
    urls = expand_shards(spec)
    info = read_info(spec)
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


def main(argv: list[str] | None = None) -> int:
    parser = cli.OneLineParser(
        prog="python -m dcgan_dist.data",
        description="Write, convert and inspect face shards.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.partition("\n\n")[2],
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="draw synthetic faces into shards (the embedded default data set)")
    p.add_argument("--out", required=True, type=cli.output_folder)
    p.add_argument(
        "--num",
        type=cli.positive_number,
        default=DataSection.synth_num,
        help="faces (default: data.synth_num's, %(default)s)",
    )
    p.add_argument("--shard-size", type=cli.positive_number, default=1000)
    p.add_argument("--size", type=int, default=ModelSection.image_size, choices=allowed_values("model.image_size"))
    p.add_argument("--channels", type=int, default=ModelSection.channels, choices=allowed_values("model.channels"))
    p.add_argument("--seed", type=cli.whole_number, default=0)
    p.add_argument("--format", default="png", choices=FORMATS, help=FORMAT_HELP)
    p.add_argument("--processes", type=cli.whole_number, default=0, help="drawing processes (0 = one per core)")

    p = sub.add_parser("convert", help="convert an image folder, a zip of images or MNIST IDX files into shards")
    p.add_argument(
        "--src", required=True, help="image folder (e.g. img_align_celeba/), .zip, or *-images-idx3-ubyte[.gz]"
    )
    p.add_argument("--out", required=True, type=cli.output_folder)
    p.add_argument(
        "--size",
        type=int,
        default=None,
        choices=allowed_values("model.image_size"),
        help=f"output size (default {ModelSection.image_size}; IDX files keep 28)",
    )
    p.add_argument(
        "--channels", type=int, default=None, choices=allowed_values("model.channels"), help="default 3 (IDX: 1)"
    )
    p.add_argument(
        "--crop",
        type=cli.whole_number,
        default=0,
        help="centre crop side in px before resizing (default: largest square)",
    )
    p.add_argument("--shard-size", type=cli.positive_number, default=1000)
    p.add_argument("--limit", type=cli.whole_number, default=0, help="convert only the first N images (0: all)")
    p.add_argument("--format", default="png", choices=FORMATS, help=FORMAT_HELP)

    p = sub.add_parser("inspect", help="count shards and samples, report image size, write a preview grid")
    p.add_argument("shards", help="directory, glob, brace pattern or URL of shards")
    p.add_argument(
        "--preview",
        default=None,
        help="preview PNG path (default: <DIR>/preview.png for a directory, the "
        "glob's folder for a local glob; none for a URL or s3:// without --preview)",
    )

    args = parser.parse_args(argv)
    try:
        if args.command == "synth":
            info = write_synthetic_shards(
                args.out,
                args.num,
                args.shard_size,
                args.size,
                args.seed,
                args.channels,
                args.format,
                processes=args.processes or None,
            )
            print(
                f"wrote {info.num_samples} synthetic faces ({info.image_size}x{info.image_size}x{info.channels}) "
                f"in {info.num_shards} shard(s) to {args.out}"
            )
        elif args.command == "convert":
            convert(
                args.src, args.out, args.size, args.channels, args.crop, args.shard_size, args.limit, fmt=args.format
            )
        else:
            expand_shards(args.shards)  # no shards there: the one line, before anything is said about a preview
            preview = args.preview or default_preview(args.shards)
            # Said before the shards are read, so that a user knows where a file will appear.
            print(
                f"preview:  {preview} (written after the count)"
                if preview
                else "preview:  none (the shards are not a local folder or glob; give --preview FILE.png)"
            )
            report = inspect(args.shards, preview)
            expected = report["expected_samples"]
            print(f"shards:   {report['shards']}")
            print(f"samples:  {report['samples']}" + (f" (dataset.json says {expected})" if expected else ""))
            for shape, n in report["image_shapes"].items():
                h, w, c = shape.split("x")
                print(f"images:   {h}x{w}, {c} channel(s): {n}")
            print(f"formats:  {', '.join(f'{k}: {v}' for k, v in report['formats'].items())}")
            print(
                f"unusable: {report['bad_samples']} sample(s) (undecodable, another size or channel count)"
                + "".join(f"\n          {name}: {n}" for name, n in report["bad_by_shard"].items())
            )
            if not report["has_dataset_json"]:
                print("note:     no dataset.json: the shards' sample counts cannot be checked")
            if "preview" in report:
                print(f"preview:  {report['preview']} written")
            for reason in report["first_bad"]:
                print(f"warning: {reason}", file=sys.stderr)
            for error in report["errors"]:
                print(f"error: shard {error}", file=sys.stderr)
            if report["errors"] or report["bad_samples"]:
                print(
                    f"{len(report['errors'])} bad shard(s), {report['bad_samples']} unusable sample(s)"
                    + (f" (the first {SHOWN_BAD_SAMPLES} above)" if report["bad_samples"] > SHOWN_BAD_SAMPLES else ""),
                    file=sys.stderr,
                )
                return 1
    except (FileNotFoundError, FileExistsError, ValueError) as exc:  # storage.StoreError too: a bucket, keys
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StoppedBySignal as exc:  # data synth: the drawing processes ended, the shards written removed
        print(f"stopped by {exc}; nothing was kept", file=sys.stderr)
        return 128 + exc.signum
    except RunError as exc:  # the object store stopped answering
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
