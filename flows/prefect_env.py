"""Prefect and DVC settings that keep the embedded setup offline and patient.

Set before ``prefect`` is imported (Prefect reads its settings at import). Each is only
a default: a value already in the environment (or a Prefect profile) wins.
"""

from __future__ import annotations

import os

OFFLINE_DEFAULTS = {
    # Prefect's temporary server would otherwise send usage telemetry (there is no network).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The temporary server imports the whole Prefect API: slow on a busy 2-core machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DVC_NO_ANALYTICS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def use_offline_defaults() -> None:
    """Apply :data:`OFFLINE_DEFAULTS` where the environment does not say otherwise."""
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)
