"""tvae_core: the TransformerVAE, its objectives and estimators, for the book.

Importing it changes nothing in the process; the entry points that want glibc's allocator setting
apply it (:mod:`tvae_core.allocator`).
"""
