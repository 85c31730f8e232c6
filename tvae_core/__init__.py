"""tvae_core: the TransformerVAE, its objectives and estimators, for the book."""
from .allocator import keep_freed_memory

keep_freed_memory()  # glibc: freed memory stays in the process (tvae_core.allocator)
