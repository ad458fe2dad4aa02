"""Training data; see `qlora.data.loaders` for the pipeline.

Names are imported on first use, so `qlora.data.rows` (checking rows before a run) loads without
torch: `qlora train` reports a bad data file before any heavy import.
"""

import importlib

_EXPORTS = {"BadRow": "formats", "RowError": "formats", "detect_format": "formats", "prompt_of": "formats",
            "render_row": "formats", "make_dataloaders": "loaders", "split_sources": "loaders",
            "load_rows": "rows", "split_rows": "rows", "chatterbot_rows": "sources", "load_source": "sources",
            "DataStats": "tokenize", "pack": "batching", "tokenize_rows": "tokenize"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qlora.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qlora.data.{_EXPORTS[name]}"), name)
