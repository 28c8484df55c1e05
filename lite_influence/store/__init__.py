"""The on-disk index: manifest (one schema), FAISS per layer, examples, atomic writes, locks.

No torch or transformers here, so opening an index, ``info``, queries by id and reading
vectors stay light. Layout (DESIGN.md)::

    INDEX_DIR/
      manifest.json        format version, model fingerprint, layers and dims, build config...
      layers/NAME.faiss    one FAISS index per layer, of unit rows; ids are row numbers of examples.jsonl
      layers/NAME.norms.npy  each example's norm (dot = unit row x norm: both metrics, one build)
      layers/NAME.tokens/  the embeddings' exact token rows (indptr, tokens, values .npy)
      examples.jsonl       id, text, pair, label and every other input column
      projection.npz       fitted eigenbases and eigenvalues (pca projection only)

Modules: ``atomic`` (file writes, folder swap, fault-injection points), ``manifest`` (the
schema), ``faiss_layers`` (every FAISS call), ``token_rows`` (sparse exact token rows),
``views`` (a layer as lookup scores it, whichever kind), ``reader`` (``IndexStore``), ``guard`` (what
``--out``/``--force`` may replace), ``lock`` (one build per ``--out``), ``writer``
(``IndexWriter``: partial folder, resume, commit).
"""

from .atomic import write_json
from .faiss_layers import FEW_QUERIES, check_factory, faiss_module, make_faiss_index, normalise, resolve_factory
from .guard import TRAIN_MARKER
from .manifest import FORMAT_VERSION, MANIFEST, METRICS
from .reader import IndexStore, is_index
from .writer import IndexWriter

__all__ = ["FORMAT_VERSION", "MANIFEST", "METRICS", "FEW_QUERIES", "TRAIN_MARKER", "IndexStore",
           "IndexWriter", "check_factory", "faiss_module", "is_index", "make_faiss_index",
           "normalise", "resolve_factory", "write_json"]
