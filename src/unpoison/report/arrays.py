"""The small arrays a run keeps for its report, as plain .npz files (numpy, never pickle).

trigger.npz  a few poisoned training images next to their clean originals, and a few
             test images next to their triggered versions (what ASR was measured on);
scores.npz   the defence's per-sample suspicion scores, the ground-truth poison mask
             and the flagged set, for the score histogram of detection runs.

Both are written by `unpoison run` and read back by `unpoison report`; loading uses
`allow_pickle=False`, so a tampered file cannot execute code.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from ..attacks.base import Attack, BackdoorTest, PoisonedSet
from ..data.imageset import ImageSet
from ..io import atomic_write_bytes

TRIGGER_FILE = "trigger.npz"
SCORES_FILE = "scores.npz"


def save_trigger_examples(path: str | os.PathLike, clean_train: ImageSet, poisoned: PoisonedSet,
                          attack: Attack, test: ImageSet, backdoor: BackdoorTest | None, n: int = 4) -> bool:
    """Write `n` (clean, poisoned) training pairs and (clean, triggered) test pairs.

    Returns False (and writes nothing) for the clean baseline, which has no trigger."""
    if attack.name == "none" or backdoor is None or poisoned.n_poisoned == 0:
        return False
    index = poisoned.poison_index[:n]
    # the same test images, in the same order, that Attack.backdoor_test triggered
    keep = test.labels != attack.target if attack.mode == "all2one" else torch.ones(len(test), dtype=torch.bool)
    test_clean = test.images[keep][:n]
    arrays = {
        "train_clean": clean_train.images[index], "train_poisoned": poisoned.train.images[index],
        "train_label": poisoned.original_labels[index], "train_given_label": poisoned.train.labels[index],
        "test_clean": test_clean, "test_triggered": backdoor.images[: len(test_clean)],
        "test_label": backdoor.true_labels[: len(test_clean)], "test_target": backdoor.target_labels[: len(test_clean)],
    }
    _save_npz(path, classes=np.array(clean_train.classes, dtype=str), **{k: v.cpu().numpy() for k, v in arrays.items()})
    return True


def save_scores(path: str | os.PathLike, scores: torch.Tensor, is_poison: torch.Tensor,
                flagged: torch.Tensor | None = None) -> None:
    arrays = {"scores": scores.detach().float().cpu().numpy(), "is_poison": is_poison.bool().cpu().numpy()}
    if flagged is not None:
        arrays["flagged"] = flagged.bool().cpu().numpy()
    _save_npz(path, **arrays)


def _save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Compressed .npz, written atomically (and by rank 0 only, under torchrun)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """The arrays of a trigger.npz / scores.npz, or None when the file is absent."""
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
