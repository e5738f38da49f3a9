"""vertebench: compare pretraining methods for 3D CT on vertebral fracture diagnosis.

The public surface is the `bench` command (see README) and the registry functions re-exported
here, which is all a plugin needs::

    from bench import register_method
    from bench.methods.base import Method
"""
from bench.errors import BenchError
from bench.registry import (
    create_method,
    get_method,
    list_datasets,
    list_methods,
    register_dataset,
    register_method,
)

__version__ = "0.1.0"
__all__ = [
    "BenchError",
    "create_method",
    "get_method",
    "list_datasets",
    "list_methods",
    "register_dataset",
    "register_method",
    "__version__",
]
