"""The ASR a model never trained on a trigger gives it: the floor under any defence's ASR.

    unpoison run --dataset cifar10 --attack none --defense none --profile quick --save-model --out runs/clean
    UNPOISON_DATA=../shared/datasets python benchmarks/trigger_floor.py runs/clean/model.pt \\
        --attack badnets --attack blended --attack sig --attack wanet --attack lc \\
        --attack badnets:mode=all2all --attack badnets:trigger=square,size=4,position=2/2,target=5

A clean model already calls some triggered test images the target class (the trigger hides
the object, or the image was close to the target anyway). A defence's ASR is read against
this floor; the issue bounds (ASR <= 2 %) sit near it for the patch triggers. Attacks whose
trigger is made from a reference model (TrojanNN) are left out: their floor depends on that
model. Prints one JSON line per attack, and writes them all with --out.
"""

from __future__ import annotations

import argparse
import json
import sys

from unpoison.artifacts import load_model
from unpoison.attacks import build_attack
from unpoison.data import load_dataset
from unpoison.metrics import backdoor_metrics
from unpoison.runtime import Runtime


def parse_attack(text: str) -> tuple[str, dict]:
    """'badnets:trigger=square,size=4,position=2/2,target=5' -> ('badnets', {...})."""
    name, _, rest = text.partition(":")
    params: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if "/" in value:
            params[key] = tuple(int(v) for v in value.split("/"))
        else:
            try:
                params[key] = int(value)
            except ValueError:
                try:
                    params[key] = float(value)
                except ValueError:
                    params[key] = value
    return name, params


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model.pt (unpoison run --save-model, or unpoison train)")
    p.add_argument("--attack", action="append", required=True, help="NAME[:key=value,...] (repeat)")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--out", default=None, help="also write every result to this JSON file")
    args = p.parse_args(argv)
    model, _ = load_model(args.model)
    runtime = Runtime.create("cpu", "auto")
    test = load_dataset(args.dataset, "test")
    results = {}
    for text in args.attack:
        name, params = parse_attack(text)
        results[text] = backdoor_metrics(model, test, build_attack(name, **params), runtime)
        print(json.dumps({"attack": text, **results[text]}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "dataset": args.dataset, "floor": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
