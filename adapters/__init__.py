"""The contract between `lorastack.train` and `lorastack.serve`.

What an adapter is on disk, the store that holds adapters, and the catalog of base models that
both sides resolve. Depends on nothing heavy: this package imports in milliseconds, and the few
functions that need torch or transformers (converting a base model) import them inside.
"""
