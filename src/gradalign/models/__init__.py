"""Models: each a ``torch.nn.Module`` class named by the ``_target_`` of one conf/model/*.yaml.

The convention that lets a new model need nothing but its class and its YAML: the pipeline
builds it as ``Model(input_shape=..., n_classes=..., **options)``, where ``input_shape`` is one
example's shape and ``n_classes`` the number of classes, both taken from the data set, and the
options are the YAML's keys except ``_target_`` and ``name``. The constructor validates its own
options. Parameter names should be stable and readable ("layers.0.weight"): they key the
per-parameter alignment metrics.
"""
