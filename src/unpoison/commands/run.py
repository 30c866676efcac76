"""`unpoison run`: one attack, one defence, one model -> OUT/metrics.json."""

from __future__ import annotations

import argparse
import json
import sys

from ..cli import _key_values, _position, add_architecture_option, add_overrides_option, add_runtime_options


def register(sub) -> None:
    p = sub.add_parser("run", help="one attack, one defence, one model: writes OUT/metrics.json",
                       description="Poison a dataset, train with a defence, and measure CA / ASR / RA.")
    p.add_argument("--dataset", default="cifar10", help="cifar10 or gtsrb (default: cifar10)")
    p.add_argument("--attack", default="none", help="attack name (default: none)")
    p.add_argument("--defense", default="none", help="defence name (default: none)")
    add_architecture_option(p)
    p.add_argument("--profile", default="quick", choices=["smoke", "quick", "paper"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data-root", default=None, help="folder with the datasets (default: $UNPOISON_DATA)")
    p.add_argument("--train-subset", type=int, default=None, help="use N random training images")
    p.add_argument("--test-subset", type=int, default=None, help="use N random test images")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the defence's main training stage")
    g = p.add_argument_group("attack parameters")
    g.add_argument("--target", type=int, default=None, help="target class (default 0)")
    g.add_argument("--poison-rate", type=float, default=None, help="fraction of the training set (default 0.1)")
    g.add_argument("--attack-mode", choices=["all2one", "all2all"], default=None)
    g.add_argument("--trigger", default=None, help="trigger variant of the attack (e.g. grid, square)")
    g.add_argument("--trigger-size", type=int, default=None, help="patch side in pixels")
    g.add_argument("--trigger-pos", default=None, help="ROW,COL of the patch's top-left pixel")
    g.add_argument("--alpha", type=float, default=None, help="blend ratio of blended triggers")
    g.add_argument("--attack-param", action="append", metavar="KEY=VALUE", help="any other attack parameter")
    add_overrides_option(p, "defense_set", "override a defence (or, with --detector, detector) setting, dotted for "
                                           "nested ones (e.g. train.optim.lr=0.05)")
    p.add_argument("--detector", default=None,
                   help="a detection-only run: score the training set with this detector (e.g. fct) instead of "
                        "training with a defence; metrics.json gets `detection`")
    p.add_argument("--clean-fraction", type=float, default=0.05,
                   help="repair baselines (ft, fp, nad, anp, mcr): the share of the training set drawn from "
                        "unpoisoned images as their clean reference (default 0.05)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints after an interruption")
    p.add_argument("--save-model", action="store_true", help="also write OUT/model.pt")
    p.add_argument("--monitor", choices=["auto", "stages", "epochs"], default="auto",
                   help="measure CA/ASR after every epoch (epochs) or only after each stage")
    p.add_argument("--no-share", action="store_true", help="do not reuse cached models between runs")
    p.add_argument("--cbd-mi", choices=["on", "off"], default=None,
                   help="CBD's mutual-information penalty (default on, as the paper; off = the official code); "
                        "the same as --set mi=on|off")
    p.add_argument("--no-report", action="store_true", help="do not write OUT/report.html")
    p.add_argument("--tta", action="store_true",
                   help="measure the final CA/ASR/RA with test-time augmentation (each image, its mirror and "
                        "1-pixel shifts); metrics.json keeps the plain numbers too, as *_no_tta")
    add_runtime_options(p)
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from ..defenses import DEFENSES
    from ..run import RunConfig, run

    attack_params = {"target": args.target, "rate": args.poison_rate, "mode": args.attack_mode,
                     "trigger": args.trigger, "size": args.trigger_size, "position": _position(args.trigger_pos),
                     "alpha": args.alpha, **_key_values(args.attack_param)}
    defense_params = _key_values(args.defense_set)
    if args.cbd_mi is not None:
        if args.defense != "cbd":
            raise SystemExit("--cbd-mi applies to --defense cbd only")
        defense_params["mi"] = args.cbd_mi == "on"
    detector_params = {}
    if args.detector is not None:
        if args.defense != "none" or args.epochs is not None:
            raise SystemExit("--detector runs a detector instead of a defence: drop --defense and --epochs "
                             "(set detector options with --set)")
        detector_params, defense_params = defense_params, {}
    if args.epochs is not None:
        defense_params[DEFENSES.get(args.defense).main_epochs] = args.epochs
    cfg = RunConfig(dataset=args.dataset, attack=args.attack, defense=args.defense, model=args.model,
                    profile=args.profile, seed=args.seed, out=args.out, data_root=args.data_root,
                    device=args.device, precision=args.precision, compile=args.compile,
                    train_subset=args.train_subset, test_subset=args.test_subset,
                    attack_params={k: v for k, v in attack_params.items() if v is not None},
                    defense_params=defense_params, resume=args.resume, save_model=args.save_model,
                    progress=not args.no_progress, monitor=args.monitor, share_models=not args.no_share,
                    detector=args.detector, detector_params=detector_params,
                    report=not args.no_report, clean_fraction=args.clean_fraction, tta=args.tta)
    metrics = run(cfg)
    shown = {k: metrics[k] for k in ("clean_acc", "asr", "robust_acc", "n_poisoned", "wall_seconds")}
    if "detection" in metrics:
        shown["detection_auroc"] = metrics["detection"]["auroc"]
    print(json.dumps(shown))
    print(f"wrote {args.out}/metrics.json ({metrics['profile_note']})", file=sys.stderr)
    return 0
