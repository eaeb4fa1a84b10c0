"""warmpod: run untrusted Python over HTTP in single-use, pre-warmed, locked-down Podman containers."""

__version__ = "0.1.0"
