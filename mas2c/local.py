"""Deprecated: the embedded model moved to `mas2c.embedded` (this alias goes in the next version).

"local" named three things (the embedded model, the unisolated sandbox backend, the batch
engine on this machine); each now has its own name. See CHANGELOG.md.
"""

from __future__ import annotations

import warnings

from mas2c.embedded import (
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_PACKAGE,
    EmbeddedModelError,
    EmbeddedUpstream,
    cache_dir,
    default_model_path,
    ensure_default_model,
)

warnings.warn("mas2c.local is deprecated: use mas2c.embedded", DeprecationWarning, stacklevel=2)

LocalModelError = EmbeddedModelError
LocalUpstream = EmbeddedUpstream

__all__ = [
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_PACKAGE",
    "EmbeddedModelError",
    "EmbeddedUpstream",
    "LocalModelError",
    "LocalUpstream",
    "cache_dir",
    "default_model_path",
    "ensure_default_model",
]
