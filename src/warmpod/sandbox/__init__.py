"""Sandboxes: the warm pool, one container's life, the agent's protocol and one run's exchange."""
