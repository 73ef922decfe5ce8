"""Sentence retrieval for memory-based editors (SERAC, IKE, MemPrompt, MeLLo).

These editors keep edits outside the weights and decide, per prompt, which stored edits
are relevant. That needs three small pieces, one module each:

- :mod:`lmpatch.memory.embedder`: texts to unit vectors (MiniLM, fully offline);
- :mod:`lmpatch.memory.index`: nearest stored vectors by inner product (exact torch
  search, FAISS for very large stores when it is installed);
- :mod:`lmpatch.memory.pools`: an on-disk cache of embeddings for large fixed text pools.

Nothing is imported here, so ``import lmpatch.memory`` stays cheap; import the modules.
"""
