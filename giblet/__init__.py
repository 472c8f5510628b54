"""giblet: naturalistic-viewing fMRI -> normalized, cached Zarr stores, and a thin DDP trainer.

Public API: :func:`open_store` (read a built store), :mod:`giblet.synth` (generated
studies), :mod:`giblet.data` (streaming datasets for training).
"""
from giblet.errors import ConfigError, GibletError, InputError, StoreError
from giblet.reader import StoreView, open_store

__version__ = "0.1.0"
__all__ = ["open_store", "StoreView", "GibletError", "ConfigError", "InputError", "StoreError", "__version__"]
