"""``hyperface report``: what an FR model sees in a dataset, in numbers and plots."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  # embed the generated set with an FR model, then report on it
  hyperface embed runs/gen/rec/train.rec --model w600k_r50.onnx --aligned --out runs/gen-emb/
  hyperface report runs/gen-emb/ --out runs/gen-report

  # identity consistency in the generator's own space, and leakage against real identities
  hyperface embed runs/gen/images --model arcface.onnx --aligned --out runs/gen-a2f/
  hyperface report runs/gen-a2f/ --identities runs/pack/identities.npy \\
      --reference webface_centroids.npy --leak-threshold 0.4 --out runs/gen-a2f-report

what it computes (no N x N matrix; pair distributions from sampled pairs, --seed):
  intra-class   mean pair cosine per identity (exact, from class sums), image-to-centroid cosine
  inter-class   each identity centroid's nearest other centroid (exact, tiled)
  verification  genuine vs impostor cosine histograms, EER, TAR at FAR, d'
  target        each image's cosine to its identity's packed embedding (--identities; label i = row i)
  leakage       each identity centroid's nearest row of a reference set of real faces (--reference),
                and how many reach --leak-threshold; leakage.tsv lists them, most similar first

  # datasets side by side (each report made with the same FR model): a table and overlaid distributions
  hyperface report --compare runs/hf10k-report runs/dcface-report runs/vec2face-report --out runs/compare
  hyperface report runs/gen-emb/ --out runs/gen-report --compare runs/dcface-report

outputs in --out: report.json, report.png, identities.jpg (labels from the dataset), leakage.tsv (with
--reference), manifest.json; with --compare, comparison.txt and comparison.png.
Labels come from the embed run's gallery.index.txt and the dataset it names (or --dataset);
--labels L.npy gives them directly for embeddings made elsewhere.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from hyperface.cli import HelpFormatter

    p = subparsers.add_parser(
        "report",
        help="inter/intra-class statistics, identity consistency and leakage of a dataset, with plots",
        description=(
            "Report on a face dataset as a face-recognition model sees it: how tight identities are, "
            "how far apart, how well images match their target identities, and how close the "
            "identities come to a reference set of real people."
        ),
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("embeddings", metavar="EMBEDDINGS", nargs="?",
                   help="gallery.npy written by `hyperface embed` (or its folder); may be left out with --compare")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (must be empty or new)")
    p.add_argument("--dataset", metavar="DATA", help="the image folder, RecordIO or generate output folder that was embedded "
                        "(default: read from the embed manifest)")
    p.add_argument("--labels", metavar="L.npy", help="integer label per embedding row, instead of reading them from the dataset")
    p.add_argument("--identities", metavar="IDS.npy", help="target identity embeddings (identities.npy of `hyperface pack`, or its folder)")
    p.add_argument("--reference", metavar="REF.npy", help="unit embeddings of real identities or faces (.npy, or a `hyperface embed` output folder), for identity leakage")
    p.add_argument("--leak-threshold", type=float, default=0.4,
                   help="cosine at or above which a synthetic identity counts as leaked (default: 0.4; pick the "
                        "threshold of your FR model at a low FAR, e.g. 1e-4)")
    p.add_argument("--unique-threshold", type=float, default=0.4,
                   help="cosine for the unique-identity count (Vec2Face's inter-separability measure: identities whose "
                        "centroid has no earlier identity above it; default: 0.4, Vec2Face's)")
    p.add_argument("--genuine-pairs", type=int, default=200_000, help="sampled genuine pairs (default: 200,000)")
    p.add_argument("--impostor-pairs", type=int, default=1_000_000, help="sampled impostor pairs (default: 1,000,000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair sampling (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (tiled nearest-neighbour searches)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous report in --out")
    p.add_argument("--compare", metavar="REPORT", nargs="+", default=[],
                   help="earlier `hyperface report` output folders (or their report.json): a table of the headline "
                        "numbers side by side and their distributions overlaid (comparison.txt, comparison.png), "
                        "each labelled by its folder name; without EMBEDDINGS, only the comparison (two or more reports)")
    p.add_argument("--no-plot", action="store_true", help="skip report.png, identities.jpg and comparison.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hyperface.common.errors import HyperfaceError
    from hyperface.common.io import read_json
    from hyperface.report.compare import COMPARISON_TABLE, read_dataset_reports
    from hyperface.report.pipeline import format_report, run_report

    if args.embeddings is None and not args.compare:
        raise HyperfaceError("give EMBEDDINGS (a `hyperface embed` output) to report on, or --compare REPORT REPORT ... to compare reports")
    others = read_dataset_reports(args.compare)  # found unreadable now, not after the statistics
    out = Path(args.out)
    clash = [e.path for e in others if e.path is not None and e.path.parent.resolve() == out.resolve()]
    if clash:
        raise HyperfaceError(f"--out {args.out} is also a --compare report ({clash[0]}): it would be replaced; choose another --out")
    if args.embeddings is None:
        given = [flag for flag, value in (("--dataset", args.dataset), ("--labels", args.labels), ("--identities", args.identities),
                                          ("--reference", args.reference)) if value is not None]
        if given:
            raise HyperfaceError(f"{', '.join(given)} describe(s) a dataset to report on: give its EMBEDDINGS too, or leave them out")
        if len(others) < 2:
            raise HyperfaceError("--compare without EMBEDDINGS needs two reports or more")
        from hyperface.report.compare import compare_reports

        compare_reports(others, out, overwrite=args.overwrite, plot=not args.no_plot)
    else:
        report = run_report(
            args.embeddings,
            args.out,
            dataset=args.dataset,
            labels=args.labels,
            identities=args.identities,
            reference=args.reference,
            leak_threshold=args.leak_threshold,
            unique_threshold=args.unique_threshold,
            genuine_pairs=args.genuine_pairs,
            impostor_pairs=args.impostor_pairs,
            seed=args.seed,
            device=args.device,
            overwrite=args.overwrite,
            plot=not args.no_plot,
            compare=others,
        )
        print(format_report(report))
    if others:  # the table, as comparison.txt holds it
        if args.embeddings is not None:
            print()  # below the report's summary
        print((out / COMPARISON_TABLE).read_text(encoding="utf-8"), end="")
    print(f"written: {args.out}/" + ", ".join(read_json(out / "manifest.json")["outputs"]))
    return 0
