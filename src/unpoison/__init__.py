"""unpoison: train trustworthy image classifiers from datasets nobody can vouch for."""

__version__ = "0.1.0"
