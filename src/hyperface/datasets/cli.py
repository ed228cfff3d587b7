"""``hyperface dataset``: look inside a face dataset, check it, and convert it between formats."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  # what is in it: images, identities, images per identity, sizes, encodings; a contact sheet
  hyperface dataset info runs/gen --preview runs/gen-preview.jpg
  # read and decode every image: unreadable files, and the same image stored under two identities
  hyperface dataset info data/dcface --check --workers 8

  # an image folder (DCFace, Vec2Face, ...) as insightface RecordIO, the JPEG bytes copied as they are
  hyperface dataset convert data/dcface --out data/dcface-rec
  # a .rec unpacked into one folder per identity
  hyperface dataset convert data/casia/train.rec --format folder --out data/casia-folders
  # the first 2,000 identities with 20 images each, as their own dataset; labels that skip made 0..K-1
  hyperface dataset convert runs/gen --identities 2000 --images-per-identity 20 --out data/hf-2k-20
  hyperface dataset convert data/sparse.rec --relabel --out data/dense
  # several sets as one: the second's identities numbered after the first's (classes.tsv says whose)
  hyperface dataset convert runs/hf10k data/dcface --out data/hf10k+dcface
  # killed? the same command with --resume keeps every finished image and continues

convert writes OUT/rec/ (train.rec, train.idx, property) and/or OUT/images/<label>/<index>.jpg,
OUT/classes.tsv (each new label's source class: folder name or old label), rejected.tsv (unreadable
source images, left out), run.json and manifest.json; `hyperface train`, `embed` and `report` take OUT itself.
"""


PAIRS_EPILOG = """\
examples:
  # held-out identities of a 10K-identity set: train on the first 9,000, verify on pairs of the rest
  hyperface dataset pairs runs/gen --from-identity 9000 --out holdout.bin
  hyperface train runs/gen --identities 9000 --val-bin lfw.bin holdout.bin --out runs/train
  # how hard are a dataset's identities for a pretrained model?
  hyperface dataset pairs data/dcface --out dcface-pairs.bin --seed 1
  hyperface evaluate w600k_r50.onnx dcface-pairs.bin
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from hyperface.cli import HelpFormatter

    p = subparsers.add_parser(
        "dataset",
        help="look inside a face dataset (info, --check) or convert it (RecordIO <-> image folder, subsets, relabel)",
        description="Tools for face-recognition training sets in insightface RecordIO or one-folder-per-identity form.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    actions = p.add_subparsers(dest="action", metavar="<action>", required=True)

    info = actions.add_parser(
        "info", help="images, identities, images per identity, sizes, encodings; --check reads every image",
        description="Summarise a dataset from its index and a sample of images (seconds on millions of images).",
        formatter_class=HelpFormatter,
    )
    info.add_argument("data", metavar="DATA", help="image folder, RecordIO (.rec or its folder), or a generate/convert output folder")
    info.add_argument("--check", action="store_true",
                      help="read and decode every image: count unreadable ones and images stored more than once "
                           "(the same bytes under two identities is label noise)")
    info.add_argument("--workers", type=int, default=4, help="decoding threads for --check (default: 4)")
    info.add_argument("--preview", metavar="FILE.jpg", help="write a contact sheet: 8 identities spread over the set, 8 images each")
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    info.set_defaults(func=run_info)

    convert = actions.add_parser(
        "convert", help="write a dataset as RecordIO and/or an image folder; subsets and relabelling on the way",
        description="Convert a dataset between insightface RecordIO and image folders, streaming: identity by "
                    "identity in label order, JPEG/PNG bytes copied unless --image-format asks to encode again.",
        epilog=EPILOG, formatter_class=HelpFormatter,
    )
    convert.add_argument("source", metavar="SOURCE", nargs="+",
                         help="image folder, RecordIO (.rec or its folder), or a generate/convert output folder; "
                              "several are concatenated, their identities one after another (labels shifted)")
    convert.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (new or empty; see --resume/--overwrite)")
    convert.add_argument("--format", choices=("rec", "folder", "both"), default="rec", help="what to write (default: rec)")
    convert.add_argument("--image-format", choices=("keep", "jpg", "png"), default="keep",
                         help="keep: copy JPEG/PNG bytes as they are, encode anything else as JPEG (default); "
                              "jpg / png: decode and encode every image")
    convert.add_argument("--quality", type=int, default=95, help="JPEG quality when encoding (default: 95)")
    convert.add_argument("--relabel", action="store_true", help="number the labels that have images 0..K-1 (classes.tsv maps them back)")
    convert.add_argument("--identities", type=int, metavar="N", help="only identities 0..N-1")
    convert.add_argument("--images-per-identity", type=int, metavar="K", help="only the first K images of each identity")
    convert.add_argument("--workers", type=int, default=4, help="threads decoding/encoding images (default: 4)")
    convert.add_argument("--no-verify", action="store_true",
                         help="copy JPEG/PNG bytes without decoding them first (faster; by default every image is "
                              "decoded and unreadable ones are left out, listed in rejected.tsv)")
    mode = convert.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an interrupted conversion in --out")
    mode.add_argument("--overwrite", action="store_true", help="replace --out (only a folder hyperface wrote)")
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")
    convert.set_defaults(func=run_convert)

    pairs = actions.add_parser(
        "pairs", help="a verification .bin (LFW's layout) from a dataset's identities, for train --val-bin and evaluate",
        description="Sample genuine and impostor pairs from a dataset into insightface's verification .bin format: "
                    "ten identity-disjoint folds, each half genuine (two images of one identity) and half impostor, "
                    "no pair twice; the encoded images are copied as they are.",
        epilog=PAIRS_EPILOG, formatter_class=HelpFormatter,
    )
    pairs.add_argument("data", metavar="DATA", help="image folder, RecordIO, or a generate/convert output folder")
    pairs.add_argument("--out", "-o", required=True, metavar="FILE.bin", help="the .bin to write (with FILE.pairs.tsv and FILE.manifest.json beside it)")
    pairs.add_argument("--pairs", type=int, default=6000, help="number of pairs, a multiple of 20 (default: 6000, as LFW)")
    pairs.add_argument("--from-identity", type=int, default=0, metavar="S", help="first identity to draw from (default: 0)")
    pairs.add_argument("--identities", type=int, metavar="K", help="draw from identities S..S+K-1 only (default: S to the last)")
    pairs.add_argument("--seed", type=int, default=0, help="random seed of the draw (default: 0)")
    pairs.add_argument("--overwrite", action="store_true", help="replace an existing FILE.bin (and its .pairs.tsv and .manifest.json)")
    pairs.set_defaults(func=run_pairs)


def run_info(args: argparse.Namespace) -> int:
    import json

    from hyperface.common.errors import check_option, check_paths_given
    from hyperface.common.text import print_text
    from hyperface.datasets.describe import describe_dataset, format_description

    check_option("--workers", args.workers, lambda v: v >= 1, "at least 1", integer=True)
    check_paths_given(("DATA", args.data), ("--preview", args.preview))
    facts = describe_dataset(args.data, check=args.check, workers=args.workers, preview=args.preview)
    print_text(json.dumps(facts, indent=2) if args.json else format_description(facts))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from hyperface.common.errors import check_option, check_paths_given
    from hyperface.common.runtime import get_logger
    from hyperface.datasets.convert import ConvertConfig, convert_dataset

    check_paths_given(*(("SOURCE", source) for source in args.source), ("--out", args.out))
    for flag, value in (("--identities", args.identities), ("--images-per-identity", args.images_per_identity)):
        if value is not None:
            check_option(flag, value, lambda v: v >= 1, "at least 1", integer=True)
    check_option("--quality", args.quality, lambda v: 1 <= v <= 100, "in 1..100", integer=True)
    check_option("--workers", args.workers, lambda v: v >= 1, "at least 1", integer=True)
    config = ConvertConfig(formats=args.format, image_format=args.image_format, quality=args.quality, relabel=args.relabel,
                           identities=args.identities, images_per_identity=args.images_per_identity, workers=args.workers,
                           verify=not args.no_verify)
    result = convert_dataset(args.source, args.out, config, resume=args.resume, overwrite=args.overwrite,
                             show_progress=False if args.no_progress else None)
    if result.complete_before:
        return 0  # convert_dataset said so
    resumed = result.images - result.written
    get_logger("hyperface.datasets").info(
        "%s: %d images of %d identities (%d written now, %d of them copied as encoded%s%s) in %.1f s", result.out,
        result.images, result.identities, result.written, result.copied,
        f", {resumed} from the interrupted run" if resumed else "",
        f"; {result.rejected} unreadable left out, see rejected.tsv" if result.rejected else "", result.seconds,
    )
    return 0


def run_pairs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hyperface.common.errors import HyperfaceError, check_option, check_paths_given, check_seed
    from hyperface.common.io import check_output_file, read_json
    from hyperface.common.manifest import Manifest
    from hyperface.common.runtime import get_logger
    from hyperface.datasets import check_outside_datasets, open_dataset
    from hyperface.evaluation.pairs import make_verification_bin, pairs_files

    check_option("--pairs", args.pairs, lambda v: v >= 20 and v % 20 == 0, "a positive multiple of 20 (10 folds, half genuine)", integer=True)
    check_option("--from-identity", args.from_identity, lambda v: v >= 0, "at least 0", integer=True)
    if args.identities is not None:
        check_option("--identities", args.identities, lambda v: v >= 1, "at least 1", integer=True)
    check_seed(args.seed)
    check_paths_given(("DATA", args.data))
    out = Path(args.out)
    if out.suffix.lower() != ".bin":
        raise HyperfaceError(f"--out {out}: give a .bin path (e.g. holdout.bin)")
    beside = pairs_files(out)
    manifest_path = beside[2]
    for path in beside:  # all three writable files before any is written
        check_output_file(path, "--out")
    existing = [path.name for path in beside if path.exists()]
    if existing and not args.overwrite:
        raise HyperfaceError(f"{', '.join(existing)} exist(s) in {out.parent}: pass --overwrite to replace, or choose another --out")
    if manifest_path.exists():  # --overwrite replaces a pairs run's files, never another tool's manifest
        try:
            stage = read_json(manifest_path).get("stage")
        except HyperfaceError:
            stage = None
        if stage != "pairs":
            raise HyperfaceError(f"{manifest_path} belongs to {f'`hyperface {stage}`' if stage else 'another program'}: "
                                 "choose another --out name")
    check_outside_datasets(out, [args.data])
    reader = open_dataset(args.data)
    data_path = Path(args.data).resolve()
    manifest = Manifest(stage="pairs", params={k: v for k, v in vars(args).items() if k in ("data", "out", "pairs", "from_identity", "identities", "seed")})
    facts = make_verification_bin(reader, out, pairs=args.pairs, seed=args.seed, first_identity=args.from_identity,
                                  identities=args.identities)
    manifest.extra.update({"source": {"path": str(data_path), "fingerprint": reader.fingerprint()}, "counts": facts})
    manifest.write(out.parent, name=manifest_path.name)
    log = get_logger("hyperface.datasets")
    if facts["unreadable_left_out"]:
        log.warning("%d unreadable image(s) left out of the pairs (the manifest names them)", len(facts["unreadable_left_out"]))
    log.info(
        "%s: %d pairs (%d genuine) over %d identities %d..%d in %d identity-disjoint folds; %s lists them",
        out, facts["pairs"], facts["genuine"], facts["identities_used"], *facts["identity_range"], facts["folds"], facts["listing"],
    )
    return 0
