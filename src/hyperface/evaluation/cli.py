"""``hyperface evaluate``: verification accuracy of a face-recognition model on real benchmarks."""

from __future__ import annotations

import argparse

EPILOG = """\
protocol (insightface's, so numbers compare with the literature):
  every image and its horizontal mirror are embedded, their raw features summed and L2-normalised;
  pair distance = squared L2; thresholds 0..4 step 0.01; 10 contiguous folds: the best threshold on
  9 folds is applied to the 10th; reported: mean +- std over folds (and VAL at FAR=1e-3).

examples:
  hyperface evaluate runs/train-r50/backbone.pth data/lfw.bin data/cfp_fp.bin data/agedb_30.bin
  hyperface evaluate w600k_r50.onnx lfw.bin calfw.bin cplfw.bin --json results.json --device cuda
  hyperface evaluate runs/train-r50/checkpoints/latest lfw.bin --batch-size 256   # newest checkpoint
  hyperface evaluate runs/train-r50/checkpoints/step-000012000/backbone.safetensors lfw.bin
  hyperface evaluate backbone.pth --ijb IJB_release/IJBC --ijb-target IJBC
  # overlay earlier --json reports (other models) in the plot and the table:
  hyperface evaluate runs/hf-r50 lfw.bin agedb_30.bin --json hf.json --plot eval.png --compare dcface.json

MODEL: an ONNX model; an insightface arcface_torch backbone.pth, iResNet, MobileFaceNet or ViT (what
`hyperface train` writes in its run folder when it ends, and with --export); an AdaFace IR .ckpt (fed
BGR, as AdaFace does); a training checkpoint's backbone.safetensors (RUN/checkpoints/step-N/); or the
folders and pointer train writes: the run folder RUN (its backbone.pth, or its newest checkpoint
while it still trains), RUN/checkpoints/step-N, or RUN/checkpoints/latest. The arch is read from the
weights (--arch to check it).

.bin files are insightface's verification sets (a pickle of (bins, issame_list)); they are loaded
with a restricted unpickler, so a crafted file is refused without running anything.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from hyperface.cli import HelpFormatter

    parser = subparsers.add_parser(
        "evaluate",
        help="verification accuracy on LFW/CFP-FP/AgeDB/CALFW/CPLFW .bin sets and IJB-B/C",
        description=(
            "Evaluate a face-recognition model (ONNX, insightface backbone.pth, or a hyperface training "
            "run or checkpoint) on insightface .bin verification sets, and optionally IJB-B/IJB-C 1:1."
        ),
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help=".onnx, backbone.pth, a checkpoint's backbone.safetensors, or a train run folder / "
        "RUN/checkpoints/step-N / RUN/checkpoints/latest",
    )
    parser.add_argument("bins", nargs="*", metavar="BIN", help="verification sets (lfw.bin, cfp_fp.bin, ...)")
    parser.add_argument("--json", metavar="FILE", help="also write the full report (per-fold numbers, versions) as JSON")
    parser.add_argument(
        "--plot", metavar="FILE",
        help="also draw the results (.png, .pdf, .svg or .jpg): per .bin set the cosine histograms of genuine and "
             "impostor pairs with the threshold, the IJB ROC curve",
    )
    parser.add_argument(
        "--compare", metavar="JSON", nargs="+", default=[],
        help="earlier `evaluate --json` reports of other models (after the BIN files: the list takes every name "
             "that follows it): their rows are printed beside this model's and "
             "their curves overlaid in --plot, each labelled by its file name; the word `paper` adds the HyperFace "
             "paper's published accuracies (iResNet-50 on HyperFace 10K x 50) and other sets' published means",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--arch", default=None, help="arch of a PyTorch file, to check it: iResNet r18..r200, MobileFaceNet mbf / mbf_large, ViT vit_t..vit_l, AdaFace ir_18..ir_se_200; read from the weights if omitted")
    parser.add_argument("--no-flip", action="store_true", help="skip flip fusion (not the standard protocol)")
    parser.add_argument("--folds", type=int, default=10, help="cross-validation folds (default: 10, the standard)")
    parser.add_argument("--ijb", metavar="DIR", help="IJB release folder holding meta/ and loose_crop/ (e.g. IJB_release/IJBC)")
    parser.add_argument("--ijb-target", default="IJBC", choices=["IJBB", "IJBC"], help="which IJB set (default: IJBC)")
    parser.add_argument(
        "--cache", metavar="DIR",
        help="keep IJB face features here, 8192 faces at a time, in a sub-folder named by the model's and the "
             "release's checksums: rerun the same command after a kill and it resumes (default: no cache)",
    )
    parser.add_argument(
        "--ijb-1n", action="store_true",
        help="also 1:N identification on the same features, as insightface's ijb_1n.py: mixed probes against the "
             "G1+G2 gallery (IJB-B: S1+S2): rank-1/5/10 and TPIR at FPIR 0.01 and 0.1",
    )
    parser.add_argument(
        "--ijb-no-detector-score", action="store_true", help="do not weight faces by their faceness score (insightface D1 off)"
    )
    parser.set_defaults(func=run, late_positionals="bins")  # BIN files may also follow the options


def run(args: argparse.Namespace) -> int:
    import time

    from pathlib import Path

    from hyperface.common.errors import HyperfaceError, check_option
    from hyperface.common.io import check_output_file, describe_input, save_json
    from hyperface.common.manifest import environment_versions
    from hyperface.common.runtime import get_logger
    from hyperface.common.text import unique_labels
    from hyperface.evaluation.runner import (
        evaluate_model, format_comparison, format_table, model_label, read_reports,
    )
    from hyperface.recognition.recognizers import resolve_model_path

    check_option("--batch-size", args.batch_size, lambda v: v >= 1, "at least 1", integer=True)
    check_option("--folds", args.folds, lambda v: v >= 2, "at least 2", integer=True)
    if args.ijb_1n and not args.ijb:
        raise HyperfaceError("--ijb-1n needs --ijb DIR (the IJB release folder)")
    # found out now, not after the evaluation; neither output may replace an input
    inputs = [("the model", resolve_model_path(args.model)), *(("a benchmark file", b) for b in args.bins),
              ("the --ijb folder", args.ijb), *(("a --compare report", c) for c in args.compare)]
    if args.json:
        check_output_file(args.json, "--json", inputs)
    if args.plot:
        from hyperface.evaluation.plots import PLOT_FORMATS

        check_output_file(args.plot, "--plot", [*inputs, ("--json", args.json)])
        if Path(args.plot).suffix.lstrip(".").lower() not in PLOT_FORMATS:
            raise HyperfaceError(f"--plot {args.plot}: give a file name ending in {', '.join('.' + f for f in PLOT_FORMATS)}")
    if args.cache and not args.ijb:
        raise HyperfaceError("--cache keeps IJB features: it needs --ijb DIR")
    distinct = list(dict.fromkeys(Path(b).resolve() for b in args.bins))
    if len(distinct) < len(args.bins):  # one file twice would be evaluated twice for one row of the table
        get_logger("hyperface.evaluate").warning("a .bin file was given more than once: each is evaluated once")
        args.bins = [next(b for b in args.bins if Path(b).resolve() == path) for path in distinct]
    own_label = model_label(args.model)
    others = read_reports(args.compare, own_label=own_label)
    started = time.time()
    report = evaluate_model(
        args.model,
        args.bins,
        arch=args.arch,
        device=args.device,
        batch_size=args.batch_size,
        flip=not args.no_flip,
        nfolds=args.folds,
        ijb_root=args.ijb,
        ijb_target=args.ijb_target,
        ijb_detector_score=not args.ijb_no_detector_score,
        cache_dir=args.cache,
        ijb_identification=args.ijb_1n,
    )
    print(format_table(report))
    if args.json:
        saved = {
            "stage": "evaluate",
            **report,
            # paths and SHA-256s: which weights and which benchmark files gave these numbers
            "inputs": {"model": describe_input(resolve_model_path(args.model)), "bins": [describe_input(b) for b in args.bins],
                       "ijb": describe_input(args.ijb)},
            "wall_seconds": round(time.time() - started, 3),
            "versions": environment_versions(),
        }
        save_json(args.json, saved)
        get_logger("evaluate").info("wrote %s", args.json)
    labels = unique_labels([own_label, *(label for label, _ in others)])
    reports = list(zip(labels, [report, *(other for _, other in others)]))
    if others:
        print()
        print(format_comparison(reports))
    if args.plot:  # after --json: a long evaluation's numbers are on disk whatever the plot does
        from hyperface.common.errors import exception_summary
        from hyperface.evaluation.plots import plot_evaluation

        try:
            plot_evaluation(args.plot, reports)
        except Exception as exc:  # noqa: BLE001 - matplotlib's many failures: one line, the numbers are kept
            raise HyperfaceError(f"--plot {args.plot}: could not draw it ({exception_summary(exc)}); the table "
                                 + ("and --json are" if args.json else "is") + " complete") from exc
        get_logger("evaluate").info("wrote %s", Path(args.plot))
    return 0
