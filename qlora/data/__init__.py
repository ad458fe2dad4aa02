"""Training data; see `qlora.data.loaders` for the pipeline."""

from qlora.data.batching import pack
from qlora.data.formats import BadRow, detect_format, prompt_of, render_row
from qlora.data.loaders import make_dataloaders, split_rows, split_sources
from qlora.data.sources import chatterbot_rows, load_records
from qlora.data.tokenize import DataStats, tokenize_rows

__all__ = ["BadRow", "DataStats", "chatterbot_rows", "detect_format", "load_records", "make_dataloaders", "pack",
           "prompt_of", "render_row", "split_rows", "split_sources", "tokenize_rows"]
