"""The `unpoison` command."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from typing import Any, Sequence

from . import __version__

# one module per verb in unpoison/commands/, each with register(subparsers)
COMMANDS = ("run", "poison", "bench", "report", "scan", "train", "predict", "repair")
# --model of every command that trains from scratch (run, poison, scan, train)
DEFAULT_ARCHITECTURE = "wrn16-1"


def _key_values(pairs: Sequence[str] | None) -> dict[str, Any]:
    """Parse KEY=VALUE pairs; values are read as JSON when they can be (numbers, lists, true)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"expected KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _position(text: str | None):
    if text is None:
        return None
    try:
        row, col = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--trigger-pos takes ROW,COL (the patch's top-left pixel), got {text!r}") from None
    return (row, col)


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on CPUs with native bf16 (AVX512-BF16/AMX) and on CUDA, else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_paths(p: argparse.ArgumentParser, data_help: str, out_help: str = "output folder") -> None:
    """--data and --out, both required: what a user command reads and where it writes."""
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--out", required=True, help=out_help)


def add_architecture_option(p: argparse.ArgumentParser, what: str = "architecture") -> None:
    """--model for a command that trains from scratch: one default architecture for all of them."""
    p.add_argument("--model", default=DEFAULT_ARCHITECTURE, help=f"{what} (default: {DEFAULT_ARCHITECTURE})")


def add_untrusted_folder_options(p: argparse.ArgumentParser, method_flag: str, default: str, names_help: str,
                                 model_what: str = "architecture") -> None:
    """What the commands over an untrusted folder (scan, train) start with: the folder, the
    output folder, the method they run (--detector or --defense, by registry name) and the
    architecture it trains; `build_detector` and `build_defense` take the last two together."""
    add_paths(p, "ImageFolder directory or archive (a train/ inside is used)")
    p.add_argument(method_flag, default=default, help=names_help)
    add_architecture_option(p, model_what)


def add_overrides_option(p: argparse.ArgumentParser, dest: str, help_text: str) -> None:
    """--set KEY=VALUE, repeatable: typed-config overrides, read with `_key_values`."""
    p.add_argument("--set", action="append", metavar="KEY=VALUE", dest=dest, help=help_text)


def add_held_out_options(p: argparse.ArgumentParser) -> None:
    """Where a user command measures accuracy without ground truth (train, repair)."""
    p.add_argument("--test", default=None, help="held-out ImageFolder with the same class names")
    p.add_argument("--val-split", type=float, default=None,
                   help="hold out this fraction of every class (default 0.1 when there is no test set; 0: none)")


def add_input_options(p: argparse.ArgumentParser, split_help: str) -> None:
    """How an untrusted folder is read: the image size and the subfolder."""
    p.add_argument("--image-size", type=int, default=32, help="images are resized to this square size (default 32)")
    p.add_argument("--split", default="auto", help=f"subfolder to {split_help} (default: train/ when present)")


def add_session_options(p: argparse.ArgumentParser) -> None:
    """Profile, seed, --resume and --no-share, then the runtime options: for a command that
    trains into an output folder."""
    p.add_argument("--profile", default="quick", choices=["smoke", "quick", "paper"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints after an interruption")
    p.add_argument("--no-share", action="store_true", help="do not reuse models of identical earlier runs")
    add_runtime_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unpoison", description=__doc__)
    parser.add_argument("--version", action="version", version=f"unpoison {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        if importlib.util.find_spec(f"unpoison.commands.{name}") is not None:
            importlib.import_module(f"unpoison.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command; under `torchrun --nproc-per-node N -m unpoison.cli ...` every process
    runs it, with the batches split between them (`unpoison.distributed`)."""
    from . import distributed

    distributed.init_from_env()
    try:
        with distributed.quiet_unless_main():
            return _main(argv)
    finally:
        distributed.shutdown()


def _main(argv: Sequence[str] | None) -> int:
    from .data import DataFormatError, DatasetNotFound

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (DatasetNotFound, DataFormatError) as exc:
        print(f"unpoison: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"unpoison: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unpoison: interrupted; rerun with --resume to continue from the last finished epoch",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
