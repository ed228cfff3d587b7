"""``hyperface train``: train an iResNet face-recognition model, or export a checkpoint."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  # The paper's recipe on a generated HyperFace set (iResNet-50, ArcFace, SGD 0.1, 26 epochs,
  # x0.1 at epochs 12/20/24, flip), verifying on LFW/CFP-FP/AgeDB every epoch:
  hyperface train data/hyperface-10k --out runs/train-r50 --arch r50 --loss arcface \\
      --epochs 26 --batch-size 256 --lr 0.1 --schedule step --milestones 12 20 24 \\
      --val-bin lfw.bin cfp_fp.bin agedb_30.bin

  # AdaFace with its augmentations, bf16, torch.compile, 1 warmup epoch:
  hyperface train DATA --out runs/ada --loss adaface --augment adaface --amp bf16 --compile --warmup-epochs 1

  # 8 GPUs on one node (batch size is per GPU; class centres are sharded over the GPUs):
  torchrun --nproc_per_node 8 -m hyperface train DATA --out runs/r100 --arch r100 --batch-size 128

  # 1M identities: partial FC scoring 20% of the class centres per step:
  torchrun --nproc_per_node 8 -m hyperface train DATA --out runs/big --partial-fc 0.2

  # arcface_torch's ViT-T recipe (wf42m_pfc03_40epoch_8gpu_vit_t): CosFace, partial FC 0.3, AdamW
  # lr 1e-3 wd 0.1, 40 epochs with 4 of warmup then polynomial decay, batch 512 per GPU:
  torchrun --nproc_per_node 8 -m hyperface train DATA --out runs/vit-t --arch vit_t_dp005_mask0 --loss cosface \\
      --partial-fc 0.3 --optimizer adamw --lr 1e-3 --weight-decay 0.1 --schedule poly --epochs 40 \\
      --warmup-epochs 4 --batch-size 512

  # Two sets as one (identities of the second after the first's; nothing copied)
  hyperface train runs/hf10k data/dcface --out runs/mix

  # Continue an interrupted run exactly where its last checkpoint left it:
  hyperface train DATA --out runs/train-r50 --resume

  # Export for insightface / ONNX runtimes:
  hyperface train --export runs/train-r50 --out backbone.pth
  hyperface train --export runs/train-r50 --out r50.onnx

DATA is a RecordIO dataset (folder with train.rec/train.idx, or a .rec file), an image folder
(one sub-folder per identity), or a `hyperface generate` output folder (its rec/, else images/). Outputs in --out: checkpoints/ (every epoch and every
--checkpoint-every steps; the last --keep-checkpoints kept), metrics.jsonl, metrics.png (loss, lr,
images/s and verification curves, redrawn at most once a minute), tensorboard/ when tensorboard is
installed, backbone.pth (insightface state dict), config.json, manifest.json.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from hyperface.cli import HelpFormatter

    parser = subparsers.add_parser(
        "train",
        help="train an iResNet, MobileFaceNet or ViT face-recognition model (ArcFace/CosFace/AdaFace) or export one",
        description=(
            "Train an iResNet, MobileFaceNet or ViT on a face dataset with ArcFace, CosFace or AdaFace (partial FC for large "
            "identity counts), on one device or many through torchrun. Checkpoints are atomic and "
            "--resume continues exactly. With --export, convert a checkpoint instead."
        ),
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("data", nargs="*", metavar="DATA",
                        help="training dataset: RecordIO folder/.rec, image folder, or a generate/convert output folder; "
                             "several are trained on as one, their identities one after another (no copy)")
    parser.add_argument("--out", required=True, help="run folder (with --export: the .pth/.pt or .onnx file to write)")
    parser.add_argument("--export", metavar="CKPT", help="export CKPT (run folder, checkpoint folder or weights file) to --out and exit")

    model = parser.add_argument_group("model and loss")
    model.add_argument("--arch", default="r50", help="backbone: iResNet r18, r34, r50, r100, r200, or arcface_torch's "
                                                     "MobileFaceNet mbf / mbf_large or ViT vit_t / vit_s / vit_b / vit_l "
                                                     "(its WebFace42M settings: vit_t_dp005_mask0, vit_s_dp005_mask_0, "
                                                     "vit_b_dp005_mask_005, vit_l_dp005_mask_005; ViTs train with AdamW, "
                                                     "see the example below) (default: r50)")
    model.add_argument("--embedding-size", type=int, default=512, help="embedding dimension (default: 512)")
    model.add_argument("--dropout", type=float, default=0.0, help="dropout before the fc layer (default: 0)")
    model.add_argument("--loss", default="arcface", choices=("arcface", "cosface", "adaface"), help="margin (default: arcface; s=64, m=0.5 / 0.4 / 0.4)")
    model.add_argument("--margin-s", type=float, help="override the scale s (default 64)")
    model.add_argument("--margin-m", type=float, help="override the margin m (default: 0.5 ArcFace, 0.4 CosFace and AdaFace)")
    model.add_argument("--margin-gradient", choices=("exact", "straight-through"), default="exact",
                       help="ArcFace only: exact (the formula's gradient, the ArcFace paper's code; default) or "
                            "straight-through (current insightface arcface_torch: margin added under no_grad)")
    model.add_argument("--interclass-filtering", type=float, default=0.0, metavar="COS",
                       help="a non-target class centre above this cosine to a sample is taken for the same identity under "
                            "another label: its logit is set to 0, no gradient (arcface_torch's interclass_filtering_threshold, "
                            "0.4 in its noisy-data runs; for sets with duplicated identities; default: 0 = off)")
    model.add_argument("--partial-fc", type=float, default=1.0, metavar="RATE", help="fraction of class centres scored per step (default: 1.0 = full softmax; 0.1-0.3 for 1M+ identities)")
    model.add_argument("--head-init", default="normal", choices=("normal", "unit"),
                       help="how the class centres start: normal = N(0, 0.01) entries, norm ~0.23 at 512-d (arcface_torch; "
                            "default), or unit = uniform(-1, 1) entries scaled to norm 1 (AdaFace's code). The logits see "
                            "only a centre's direction, but a short one turns faster: the same SGD step turns it ~20x "
                            "as far at first")

    data = parser.add_argument_group("data subset (ablations: fewer identities or images from one rendered set)")
    data.add_argument("--identities", type=int, metavar="N", help="train on identities 0..N-1 of DATA only (default: all)")
    data.add_argument("--images-per-identity", type=int, metavar="K",
                      help="the first K images of each identity only (generate renders image j from (seed, identity, j), "
                           "so these are what `generate -k K` gives; default: all)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=26, help="epochs (default: 26)")
    optim.add_argument("--batch-size", type=int, default=128, help="images per forward pass per process (default: 128)")
    optim.add_argument("--grad-accum", type=int, default=1, metavar="K",
                       help="forward passes per optimiser step: each step sees --batch-size x K images per process in "
                            "the memory of --batch-size (arcface_torch's gradient_acc; default: 1)")
    optim.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"), help="default: sgd (momentum 0.9)")
    optim.add_argument("--lr", type=float, help="peak learning rate (default: 0.1 SGD, 1e-3 AdamW)")
    optim.add_argument("--weight-decay", type=float, help="default: 5e-4 SGD, 0.05 AdamW")
    optim.add_argument("--bn-weight-decay", action=argparse.BooleanOptionalAction, default=True,
                       help="weight decay on BatchNorm's scale and shift too (default: on, as arcface_torch). "
                            "--no-bn-weight-decay exempts every BatchNorm layer's parameters, as AdaFace's code "
                            "(its split_parameters); the rest, class centres included, still decay. LayerNorm and "
                            "PReLU are not BatchNorm: they decay either way")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    optim.add_argument("--schedule", default="step", choices=("step", "poly"), help="after warmup: x gamma at the milestones, or polynomial (--poly-power) to 0 (default: step)")
    optim.add_argument("--poly-power", type=float, default=2.0,
                       help="power of the poly schedule (default: 2, arcface_torch's PolyScheduler; 1 = linear, what its "
                            "later train_v2.py gets from PolynomialLRWarmup's default)")
    optim.add_argument("--milestones", type=int, nargs="+", default=[12, 20, 24], help="epochs where the step schedule decays (default: 12 20 24)")
    optim.add_argument("--gamma", type=float, default=0.1, help="step decay factor (default: 0.1)")
    optim.add_argument("--warmup-epochs", type=float, default=0.0,
                       help="linear warmup from 0, in epochs, timed as arcface_torch's PolyScheduler (default: 0)")
    optim.add_argument("--clip-grad-norm", type=float, default=5.0, help="clip the backbone gradient norm (default: 5; 0 = off)")
    optim.add_argument("--augment", default="flip", choices=("none", "flip", "adaface"), help="flip, or AdaFace's crop/low-res/photometric set plus flip (default: flip)")
    optim.add_argument("--augment-p", type=float, default=0.2, help="probability of each AdaFace augmentation (default: 0.2)")

    speed = parser.add_argument_group("speed")
    speed.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"), help="autocast dtype (default: auto = bf16 on CUDA when supported, else fp16; none on CPU)")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="NHWC memory format (default: on for CUDA)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    speed.add_argument("--workers", type=int, help="DataLoader worker processes per GPU (default: min(8, cores per process - 1); 0 = load in the main process)")
    speed.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (torchrun: one GPU per process, LOCAL_RANK; default: auto)")

    run = parser.add_argument_group("run")
    run.add_argument("--val-bin", nargs="*", default=[], metavar="BIN",
                     help="verification .bin files (insightface format) evaluated during training; with no file, none "
                          "(a --resume otherwise keeps the run's)")
    run.add_argument("--val-every", type=int, default=0, help="verify every N steps (default: 0 = every epoch)")
    run.add_argument("--checkpoint-every", type=int, default=2000, help="checkpoint every N steps, besides every epoch (default: 2000; 0 = epochs only)")
    run.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints to keep (default: 2; 0 = keep all)")
    run.add_argument("--log-every", type=int, default=50, help="log loss/lr/throughput every N steps (default: 50): to metrics.jsonl, and as a log line on stderr when no progress bar is shown (not a terminal, or HYPERFACE_PROGRESS=0)")
    run.add_argument("--max-steps", type=int, help="stop after N >= 1 steps in total (smoke tests; the schedule still spans --epochs)")
    run.add_argument("--seed", type=int, default=0, help="seed for init, data order and augmentation (default: 0)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint; the settings that shape the run (arch, loss, "
                          "batch, schedule, subset, ...) come from its config.json unless given again, and a value given "
                          "that differs is refused")
    run.add_argument("--overwrite", action="store_true", help="replace an earlier hyperface run in --out (with --export: the file --out names)")
    parser.set_defaults(func=run_command, late_positionals="data")  # DATA may also follow the options


def _with_run_settings(config, args: argparse.Namespace):
    """For --resume: every setting that shapes the run and was not given on this command line is
    taken from the run's config.json, so `hyperface train DATA --out RUN --resume` is enough."""
    import dataclasses
    from pathlib import Path

    from hyperface.cli import explicit_dests
    from hyperface.common.runtime import get_logger
    from hyperface.training.trainer import _RESUME_FIXED, _SUBSET_FIELDS, _plain

    from hyperface.common.io import read_json

    log = get_logger("hyperface.train")
    if not (Path(args.out) / "config.json").is_file():
        # A requeued job may pass --resume from its first start; a mistyped --out lands here too.
        log.warning("--resume: %s holds no run yet (no config.json): starting a new run with this command's "
                    "settings (arch %s, %d epochs, batch %d)", args.out, config.arch, config.epochs, config.batch_size)
        return config
    saved = read_json(Path(args.out) / "config.json")  # damaged: say so, not "arch 'r_tiny' -> 'r50'"
    given = explicit_dests(args.stage_parser, getattr(args, "argv", []))
    taken = {}
    for name in (*_RESUME_FIXED, *_SUBSET_FIELDS, *_RESUME_KEPT):
        if name in saved and _CLI_DESTS.get(name, name) not in given and saved[name] != _plain(getattr(config, name)):
            value = saved[name]
            taken[name] = tuple(value) if isinstance(value, list) else value
    missing = [path for path in taken.get("val_bins", ()) if not Path(path).is_file()]
    if missing:  # the run's verification files moved: resume without them rather than refuse
        log.warning("--resume: the run's --val-bin %s not found; resuming without (pass --val-bin again)", ", ".join(missing))
        taken["val_bins"] = tuple(path for path in taken["val_bins"] if path not in missing)
    if taken:
        log.info("resuming with the run's settings from config.json: %s", ", ".join(f"{k} {v}" for k, v in taken.items()))
    return dataclasses.replace(config, **taken)


#: Bookkeeping a resumed run keeps from its config.json unless given again (unlike _RESUME_FIXED, a
#: new value is taken, not refused): verification, checkpointing and logging as the run began.
_RESUME_KEPT = ("val_bins", "val_every", "checkpoint_every", "keep_checkpoints", "log_every")
#: TrainConfig fields whose command-line option has another dest.
_CLI_DESTS = {"val_bins": "val_bin"}


def run_command(args: argparse.Namespace) -> int:
    import os

    from hyperface.common.errors import HyperfaceError, check_paths_given

    if args.export:
        from pathlib import Path

        from hyperface.common.io import check_output_file
        from hyperface.training.checkpoint import export_backbone

        check_output_file(args.out, "--out")  # a folder, or nowhere to write: before the checkpoint loads
        if Path(args.out).exists() and not args.overwrite:  # weights are precious: never replaced unasked
            raise HyperfaceError(f"--out {args.out} exists: pass --overwrite to replace it, or choose another file")
        path = export_backbone(args.export, args.out)
        print(f"exported {args.export} -> {path}")
        return 0
    if not args.data:
        raise HyperfaceError("give the training dataset (DATA), or --export CKPT to convert a checkpoint")
    check_paths_given(*(("DATA", path) for path in args.data))

    from hyperface.training.trainer import TrainConfig, train

    config = TrainConfig(
        data=args.data[0] if len(args.data) == 1 else tuple(args.data),
        out=args.out,
        identities=args.identities,
        images_per_identity=args.images_per_identity,
        arch=args.arch,
        embedding_size=args.embedding_size,
        dropout=args.dropout,
        loss=args.loss,
        margin_s=args.margin_s,
        margin_m=args.margin_m,
        margin_gradient=args.margin_gradient,
        partial_fc=args.partial_fc,
        head_init=args.head_init,
        interclass_filtering=args.interclass_filtering,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        bn_weight_decay=args.bn_weight_decay,
        momentum=args.momentum,
        schedule=args.schedule,
        milestones=tuple(args.milestones),
        gamma=args.gamma,
        poly_power=args.poly_power,
        warmup_epochs=args.warmup_epochs,
        clip_grad_norm=args.clip_grad_norm,
        augment=args.augment,
        augment_p=args.augment_p,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        workers=args.workers,
        device=args.device,
        val_bins=tuple(args.val_bin),
        val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every,
        max_steps=args.max_steps,
        seed=args.seed,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    if args.resume:
        config = _with_run_settings(config, args)
    result = train(config)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 speaks for the job
        _leave_torchrun_rank()
        return 0
    epochs = f"{result.epochs_done} epoch{'' if result.epochs_done == 1 else 's'}"
    summary = f"trained {result.steps} steps ({epochs}) -> {result.out}/backbone.pth"
    if result.nothing_to_do:
        summary = f"nothing to resume: {result.out} already {summary}"
    if result.last_loss is not None:
        summary += f"; last loss {result.last_loss:.4f}"
    if result.val:
        summary += "; " + ", ".join(f"{k} {v:.4f}" for k, v in result.val.items())
    print(summary)
    _leave_torchrun_rank()
    return 0


def _leave_torchrun_rank() -> None:
    """A torchrun rank whose training ended well exits here, without the interpreter's teardown:
    gloo's threads can still hold tensors then and abort the process (SIGABRT, "terminate called
    without an active exception", pytorch/pytorch#179291), turning a finished run into a failed job.
    Every file is written and closed by now; a single process (no torchrun) returns as usual."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


# The CLI contract names the handler ``run``.
run = run_command
