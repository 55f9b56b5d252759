"""The web console: one self-contained page (no CDN; it works offline) served at `/` and
`/console`, with the data it draws from the API's own routes (the caller's key decides what it
sees), plus `/v1/engine/stats`: the engine's published snapshot, once or as a stream.

The page and its script and style are package files read with importlib.resources, so they
work from a checkout, an editable install and a wheel alike.
"""

from llmos.server.console.routes import install

__all__ = ["install"]
