"""lite-influence: which training examples made a language model do this?

Per-layer Kronecker-projected gradients in FAISS indexes, nearest-neighbour lookup of
proponents and opponents, rank/vote aggregation across layers, and the Noise Detection Rate.
The heavy imports (torch, transformers, faiss) happen only when a function needs them.
"""

__version__ = "0.1.0"

__all__ = ["build_index", "InfluenceIndex", "BuildConfig", "UserError", "fit_projection", "merge_shards",
           "add_rows", "delete_rows", "__version__"]
_MORE = {"fit_projection": "fitting", "merge_shards": "shards", "add_rows": "grow", "delete_rows": "grow"}


def __getattr__(name):
    if name in ("build_index", "InfluenceIndex"):
        from . import api

        return getattr(api, name)
    if name == "BuildConfig":
        from .config import BuildConfig

        return BuildConfig
    if name == "UserError":
        from .errors import UserError

        return UserError
    if name in _MORE:
        import importlib

        return getattr(importlib.import_module(f".{_MORE[name]}", __name__), name)
    raise AttributeError(name)
