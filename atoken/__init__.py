"""atoken's Python API: ``atoken.load(checkpoint)`` -> a :class:`Tokenizer` with ``encode``,
``decode`` and ``embed`` (see :mod:`atoken_core.api`)."""

from atoken_core import __version__
from atoken_core.api import Encoding, Tokenizer, TokenizerError, load

__all__ = ["Encoding", "Tokenizer", "TokenizerError", "__version__", "load"]
