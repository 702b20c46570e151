"""The benchmark cases: one module per op family, each registering its ops (``register_op``) when imported.

The import below sets the order of ``OPS``: the default ``--ops``, the order of the table's rows and the plot's
panels. A new op's module goes into it (see "Adding an op" in ``fused_ops.bench``).
"""

# imported for their registrations, in this order: the optimizers first (not alphabetical, hence I001)
from . import adam, adam_lowbit, lion, sgd, multi_tensor, zero  # noqa: F401, I001
