"""atoken core: sparse 4D latents, the plugin interfaces and registries, recipes and the engine.

Importing this package is cheap (pluggy only): plugins import ``hookimpl`` from here at
entry-point load time, before any torch work is needed.
"""

from importlib.metadata import PackageNotFoundError, version

import pluggy

PROJECT_NAME = "atoken"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

try:
    __version__ = version("atoken")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["PROJECT_NAME", "__version__", "hookimpl", "hookspec"]
