"""pytest setup shared by all flashjax tests.

Tests run on CPU by default (Pallas backends in interpret mode). JAX_PLATFORMS is only set
when the caller has not chosen a platform, so GPU checks run with e.g.
`JAX_PLATFORMS=cuda python -m pytest -m gpu tests`.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
