"""Data sets: each a function named by the ``_target_`` of one conf/dataset/*.yaml that returns
``Splits`` (train/val/test tensors and the number of classes).

The pipeline calls it with the YAML's keys except ``_target_`` and ``name``; the function
validates its own arguments. Models are then built from ``Splits.input_shape`` and
``Splits.n_classes``, so a data set and a model never need to know of each other.
"""

from gradalign.data.splits import Splits

__all__ = ["Splits"]
