"""raytrain-speech: an elastic Ray trainer for speech models (see README.md and docs/architecture.md)."""

VERBOSE_ENV = "RAYTRAIN_SPEECH_VERBOSE"
"""Set to 1 by the CLI's ``--verbose``: ray_session then leaves Ray's console output as Ray prints it
(here, the package's leaf, so the CLI sets it without importing Ray and Ray's side reads it without
importing the CLI)."""
