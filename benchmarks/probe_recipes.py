"""Which probe recipe ranks a rare poison? For diagnosis: train a probe with DLP's SL recipe
(detect/entropy.py, quick profile) changed by `--set` (e.g. augment=weak, optim.lr=0.1,
ema_decay=0.995, label_smoothing=0.1, epochs=3) on a poisoned set, and after every epoch print
the ASR and how seed expansion (detect/expand.py) on that epoch's model ranks the poison:
the seeds' poison share, AUROC, and the share of the poison in the top 10 % and 20 %. With
EMA on, the EMA model is the one scored, as the defence would. The poison mask is read for the
printout only.

    PYTHONPATH=src python benchmarks/probe_recipes.py --attack blended --param rate=0.01 \
        --set augment=weak --set optim.lr=0.1
"""

from __future__ import annotations

import argparse
import os

import torch

from unpoison.attacks import build_attack
from unpoison.config import apply_overrides
from unpoison.context import DefenseContext
from unpoison.data import load_dataset
from unpoison.detect.entropy import prediction_entropy, sl_recipe
from unpoison.detect.expand import seed_similarity
from unpoison.metrics import backdoor_metrics, detection_metrics, recall_at_fraction
from unpoison.runtime import Runtime, generator
from unpoison.train.engine import Engine
from unpoison.train.supervised import DeviceData, extract_features, predict, supervised_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--attack", required=True)
    parser.add_argument("--param", action="append", default=[], help="attack parameter KEY=VALUE")
    parser.add_argument("--set", action="append", default=[], help="probe recipe override KEY=VALUE")
    parser.add_argument("--model", default="wrn16-1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="save each epoch's features, logits, labels and mask "
                                                      "here (SAVE-epochN.pt), to try other scores offline")
    args = parser.parse_args()
    params = {k: eval(v, {}) for k, v in (p.split("=", 1) for p in args.param)}
    recipe = apply_overrides(sl_recipe("quick"), {k: eval(v, {}) if v[:1].isdigit() or v in ("None", "True", "False")
                                                  else v for k, v in (s.split("=", 1) for s in args.set)})
    print(recipe, flush=True)
    runtime = Runtime.create("cpu", "auto")
    root = os.environ["UNPOISON_DATA"]
    train, test = load_dataset(args.dataset, "train", root), load_dataset(args.dataset, "test", root)
    attack = build_attack(args.attack, **params)
    poisoned = attack.poison(train, generator(args.seed, "poison"))
    data, poison = poisoned.untrusted(), poisoned.is_poison
    backdoor = attack.backdoor_test(test)
    ctx = DefenseContext(runtime, "quick", args.seed, args.model, "/tmp/probe-recipes", progress=False)
    engine = Engine(ctx.new_model(data), recipe.optim, runtime, name="SL", epochs=recipe.epochs,
                    steps_per_epoch=-(-len(data) // recipe.batch_size), seed=args.seed,
                    ema_decay=recipe.ema_decay, progress=False)
    train_pass = supervised_epoch(DeviceData(data, runtime), recipe.batch_size, recipe.augment, recipe.label_smoothing)

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> dict:
        train_pass(engine, epoch, g)
        model = engine.eval_model.eval()
        logits = predict(model, data.images, runtime).float()
        seeds = torch.argsort(prediction_entropy(logits), stable=True)[: max(2, len(data) // 100)]
        features = extract_features(model, data.images, runtime)
        scores = seed_similarity(features, seeds, 10)
        if args.save:
            torch.save({"features": features.float(), "logits": logits, "labels": data.labels, "poison": poison},
                       f"{args.save}-epoch{epoch + 1}.pt")
        auroc = detection_metrics(scores, poison)["auroc"]
        asr = backdoor_metrics(model, test, attack, runtime, backdoor)["asr"]
        print(f"epoch {epoch + 1}: ASR {asr:.3f} | seeds poison {float(poison[seeds].float().mean()):.2f} | "
              f"AUROC {auroc:.3f} | top 10 % holds {recall_at_fraction(scores, poison, 0.1):.3f}, "
              f"top 20 % {recall_at_fraction(scores, poison, 0.2):.3f} of the poison", flush=True)
        return {}

    engine.fit(epoch_fn)


if __name__ == "__main__":
    main()
