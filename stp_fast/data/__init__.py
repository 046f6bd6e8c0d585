"""Data sets for training, search and evaluation, held in memory as uint8 tensors.

``load_dataset(spec)`` reads one of the forms in ``DATASET_HELP`` (``digits``, ``npz:PATH``,
``cifar10:DIR``, ``cifar100:DIR``, ``imagefolder:DIR``) into a ``Datasets``; its ``loader(split, ...)``
gives seeded, DDP-shardable ``ImageLoader`` epochs with batched crop/flip augmentation.
scikit-learn, pillow and numpy are imported only when a reader needs them.
"""

from stp_fast.data.datasets import AUGMENT_CHOICES, DATASET_HELP, Datasets, ImageSource, channel_stats, load_dataset
from stp_fast.data.loader import ImageLoader, augment_batch, epoch_generator
from stp_fast.data.sources import DatasetError

__all__ = [
    "AUGMENT_CHOICES",
    "DATASET_HELP",
    "DatasetError",
    "Datasets",
    "ImageLoader",
    "ImageSource",
    "augment_batch",
    "channel_stats",
    "epoch_generator",
    "load_dataset",
]
