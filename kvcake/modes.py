"""Every reuse mode by name: the one table of kvcake's mechanisms.

A request (or the `reuse` setting) names a mode: a way to take its exact prefix (`PREFIX_MODES`,
or split:M for M chunks) or a document mechanism (a row of `DOCUMENT_MECHANISMS`). The config's
choices, the parsers of requests and HTTP bodies, the engine's strategy table and `route`
(kvcake.reuse.routing) all read the names here. A row names its class by import path, as vLLM's
KV connector factory does, so the settings can list the modes without importing torch; the
engine imports the class when it builds its table. Adding a mechanism is its file in
`kvcake/reuse/` and its row here.
"""

from __future__ import annotations

PREFIX_MODES = ("compute", "load", "cake")
DOCUMENT_MECHANISMS = {
    "blend": "kvcake.reuse.blend.BlendReuse",
    "tune": "kvcake.reuse.tune.TuneReuse",
}
"""Document mode name -> the import path of the `DocumentReuse` class that serves it."""
MODES = (*PREFIX_MODES, "split:M", *DOCUMENT_MECHANISMS)
"""Every value of a `reuse` setting or a request's mode (M: a chunk count)."""
