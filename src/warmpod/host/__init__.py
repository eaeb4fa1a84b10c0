"""The host: the Podman API client, the private Podman service, host facts, and the runner image."""
