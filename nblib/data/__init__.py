"""The Data cell: a dataset from the Hub, local files or the built-in corpus, a tokenizer, and the
token blocks, tokenized once and cached (`cache`); `data.prepare(cfg)` is what the cell calls."""
from nblib.data.cache import Blocks, Corpus, cache_key, prepare

__all__ = ["Blocks", "Corpus", "cache_key", "prepare"]
