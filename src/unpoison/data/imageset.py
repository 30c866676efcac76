"""The in-memory dataset every part of unpoison passes around."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageSet:
    """Labelled images decoded once into memory.

    images: uint8 tensor (N, 3, H, W); labels: int64 tensor (N,); classes: the class
    names, index = label; paths: where each image came from, when it came from files.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    paths: list[str] | None = None
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        self.labels = self.labels.to(torch.int64)
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")
        if self.paths is not None and len(self.paths) != len(self):
            raise ValueError(f"{len(self)} images but {len(self.paths)} paths")
        if len(self) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)})")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor) -> "ImageSet":
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        paths = [self.paths[i] for i in index.tolist()] if self.paths is not None else None
        return ImageSet(self.images[index], self.labels[index], list(self.classes), paths)

    def with_labels(self, labels: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images, labels, list(self.classes), self.paths)

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)

    def head(self, n: int, generator: torch.Generator | None = None) -> "ImageSet":
        """A random subset of n images (all of them when n >= N), stratification-free."""
        if n >= len(self):
            return self
        order = torch.randperm(len(self), generator=generator)[:n].sort().values
        return self.subset(order)
