"""Knowledge: retrieval over the user's own documents, for a model to quote from.

``build_index`` cuts the documents of any ``lmforge data`` source into overlapping chunks and
stores them in one SQLite file with a BM25 full-text index; ``open_index(path).search(q, k)``
returns the best chunks with their source path and character offsets; ``format_quoted`` renders
hits for a prompt as marked quotations with citations. See :mod:`lmforge.knowledge.index`.
"""

from lmforge.knowledge.index import (Hit, Index, IndexConfig, build_index, format_quoted, open_index,
                                     stored_config)

__all__ = ["Hit", "Index", "IndexConfig", "build_index", "format_quoted", "open_index", "stored_config"]
