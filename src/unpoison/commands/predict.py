"""`unpoison predict`: label images with a model that `unpoison train` (or `repair`) wrote.

Writes a CSV with columns path,pred,class_name,confidence. The model is read with
`torch.load(weights_only=True)` and must carry unpoison's format marker; images are
resized with the same policy the model was trained with.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import add_paths, add_runtime_options

PREDICTIONS_HEADER = ["path", "pred", "class_name", "confidence"]


def register(sub) -> None:
    p = sub.add_parser("predict", help="label images with a trained model: CSV path,pred,class_name,confidence",
                       description="Label every image of a folder (ImageFolder, flat folder, archive or one "
                                   "image) with a model.pt written by `unpoison train` or `unpoison repair`.")
    p.add_argument("--model", required=True, help="model.pt, or the output folder that holds it")
    add_paths(p, "images to label", out_help="CSV file to write")
    p.add_argument("--batch-size", type=int, default=512)
    add_runtime_options(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from ..console import UserError, say
    from ..data.loose import read_images_to_predict
    from ..data.untrusted import resize_policy
    from ..io import write_csv
    from ..runtime import Runtime
    from ..train.supervised import predict

    model_path, data_path, out = Path(args.model).expanduser(), Path(args.data).expanduser(), Path(args.out)
    if not data_path.exists():
        raise UserError(f"--data {data_path} does not exist")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the CSV file to write (e.g. {out}/preds.csv)")
    runtime = Runtime.create(args.device, args.precision)
    model, info = load_user_model(model_path, runtime)
    classes, size = list(info["classes"]), tuple(info["input_size"])
    say(f"[predict] {model_path}: {info['architecture']}, {len(classes)} classes; {resize_policy(size)}")

    images = read_images_to_predict(data_path, size, classes)
    if images.skipped:
        say(f"[predict] skipped {len(images.skipped)} files; first: {images.skipped[0]}")
    probs = predict(model, images.images, runtime, args.batch_size).softmax(1)
    confidence, pred = probs.max(1)
    rows = [(p, int(y), classes[int(y)], f"{float(c):.6f}") for p, y, c in zip(images.paths, pred, confidence)]
    write_csv(out, PREDICTIONS_HEADER, rows)

    counts = torch.bincount(pred, minlength=len(classes))
    top = counts.argsort(descending=True)[:5].tolist()
    print(f"labelled {len(rows)} images ({len(images.skipped)} skipped); most predicted: "
          + ", ".join(f"{classes[i]} {int(counts[i])}" for i in top if counts[i]))
    known = images.labels >= 0
    if known.any():
        acc = float((pred[known] == images.labels[known]).float().mean())
        print(f"accuracy against the folder's class names: {acc:.4f} over {int(known.sum())} images")
    print(f"wrote {out}")
    return 0


def load_user_model(path: Path, runtime):
    """A model.pt written by unpoison, on the runtime's device, or a clear error."""
    from .. import artifacts
    from ..console import UserError

    if path.is_dir() and not (path / "model.pt").exists():
        raise UserError(f"{path} holds no model.pt; give the file or the folder `unpoison train` wrote")
    if not path.exists():
        raise UserError(f"--model {path} does not exist")
    try:
        model, info = artifacts.load_model(path, runtime.device)
    except artifacts.NotAnUnpoisonModel:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        # the format marker is there but the contents do not build a model: damaged or forged
        raise artifacts.NotAnUnpoisonModel(f"{path} claims to be an unpoison model but cannot be rebuilt "
                                           f"({type(exc).__name__}: {str(exc)[:200]}); it is damaged or "
                                           "was not written by unpoison") from None
    return runtime.prepare_model(model).eval(), info
