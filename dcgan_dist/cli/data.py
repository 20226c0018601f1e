"""Shard tools.

    python -m dcgan_dist.data synth --out data/faces --num 20000 --size 64
    python -m dcgan_dist.data synth --out data/faces-skin --num 20000 --size 32 --labels skin   # labelled
    python -m dcgan_dist.data convert --src img_align_celeba --out img_align_celeba-shards --size 64
    python -m dcgan_dist.data convert --src fashion-mnist --out fashion-shards --classes fashion  # IDX + labels
    python -m dcgan_dist.data inspect data/faces     # exits 1 when a shard is unreadable or short

`<command> --help` lists each command's options. They describe the shards written or read, not a run: these
commands take no --config or key=value settings; where an option and a setting mean the same, the option's
default is the setting's in the schema (synth --num: data.synth_num, --size: model.image_size, --channels:
model.channels).
"""

from __future__ import annotations

import argparse
import sys

from dcgan_dist.cli import args as cli
from dcgan_dist.config import DataSection, ModelSection, allowed_values
from dcgan_dist.data.convert import convert
from dcgan_dist.data.inspect import SHOWN_BAD_SAMPLES, default_preview, inspect
from dcgan_dist.data.shards import FORMATS, DatasetInfo, expand_shards
from dcgan_dist.data.synth import LABELS, write_synthetic_shards
from dcgan_dist.errors import RunError
from dcgan_dist.stopping import StoppedBySignal

FORMAT_HELP = (
    "png (default: lossless, smallest), jpg (lossy), or raw (uint8 arrays: no decoding, the fastest "
    "loader, larger on disk); the loader reads any of them without a flag"
)


@cli.one_line_errors  # what the except clauses below leave: one line, its exit code (cli/args.py)
def main(argv: list[str] | None = None) -> int:
    argv, as_json = cli.take_flag(sys.argv[1:] if argv is None else argv, "--json")
    outcome: dict = {}
    with cli.json_stdout(as_json):  # --json: stdout holds the result alone
        code = run(argv, outcome)
    if as_json and outcome:
        cli.print_result(outcome)
    return code


def written(command: str, info: DatasetInfo, out: str) -> dict:
    """synth's and convert's --json result: what they wrote (dataset.json's figures). classes and class_counts:
    None for unlabelled shards, as inspect reports them."""
    return {
        "command": command,
        "out": str(out),
        "shards": info.num_shards,
        "samples": info.num_samples,
        "image_size": info.image_size,
        "channels": info.channels,
        "format": info.format,
        "skipped": info.skipped,
        "classes": list(info.classes) or None,
        "class_counts": dict(info.class_counts) if info.classes else None,
    }


def run(argv: list[str], outcome: dict) -> int:
    """The command; outcome: filled with what synth/convert wrote (written) or inspect's report (the counts per
    shard, and per class for labelled shards), which --json prints."""
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
    p.add_argument(
        "--labels",
        default=None,
        choices=list(LABELS),
        help="label each face with a class drawn anyway: "
        + "; ".join(f"{name}: {', '.join(classes)} ({what})" for name, (classes, what) in LABELS.items())
        + " (default: unlabelled; skin's classes are the most distinct)",
    )

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
    p.add_argument(
        "--classes",
        default=None,
        help="labels: IDX files' class names when label files lie beside them: digits ('0'..'9'), fashion "
        "(Fashion-MNIST's), or names joined by commas (default: fashion when the path names Fashion-MNIST, else "
        "digits); a folder of class subfolders is labelled by their names; none: write no labels",
    )

    p = sub.add_parser("inspect", help="count shards and samples, report image size, write a preview grid")
    p.add_argument("shards", help="directory, glob, brace pattern or URL of shards")
    p.add_argument("--json", action="store_true", help=cli.JSON_HELP)
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
                labels=args.labels,
            )
            print(
                f"wrote {info.num_samples} synthetic faces ({info.image_size}x{info.image_size}x{info.channels}) "
                f"in {info.num_shards} shard(s) to {args.out}"
                + (f", labelled {', '.join(f'{k}: {v}' for k, v in info.class_counts.items())}" if info.classes else "")
            )
            outcome.update(written("data synth", info, args.out))
        elif args.command == "convert":
            info = convert(
                args.src,
                args.out,
                args.size,
                args.channels,
                args.crop,
                args.shard_size,
                args.limit,
                fmt=args.format,
                classes=args.classes,
            )
            outcome.update(written("data convert", info, args.out))
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
            outcome.update(command="data inspect", **report)
            expected = report["expected_samples"]
            print(f"shards:   {report['shards']}")
            print(f"samples:  {report['samples']}" + (f" (dataset.json says {expected})" if expected else ""))
            for shape, n in report["image_shapes"].items():
                h, w, c = shape.split("x")
                print(f"images:   {h}x{w}, {c} channel(s): {n}")
            print(f"formats:  {', '.join(f'{k}: {v}' for k, v in report['formats'].items())}")
            if report["class_counts"] is not None:
                print(f"classes:  {len(report['classes'])} (dataset.json), samples per class:")
                for label, (name, n) in enumerate(report["class_counts"].items()):
                    print(f"          {label:>3} {name}: {n}")
            else:
                print("classes:  none (unlabelled)")
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
    except (FileNotFoundError, FileExistsError, ValueError) as exc:  # StoreError too: a bucket, keys
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
