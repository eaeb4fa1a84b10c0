"""warmpod's exception tree; no framework imports, ``app`` maps these to problem details.

WarmpodError
├── SettingsError      configuration cannot be parsed or is inconsistent
├── EngineError        Podman could not be reached or refused a call
├── ImageError         the runner image cannot be found or built
├── PoolUnavailable    no container became free within the acquire timeout (the run stays queued)
├── ProtocolError      a frame from a container broke the agent protocol
├── InvalidRun         a run request is well formed but asks for something not allowed (422)
│   ├── InvalidFile    an input file's path, content or size is not allowed (422)
│   ├── InvalidProgram the entrypoint, an argument or an environment variable is not allowed (422)
│   ├── InvalidLabel   a run's label, or a label in a filter, breaks a rule (422)
│   ├── InvalidCallback a run's callback_url is malformed or outside the webhook allow-list (422)
│   └── InvalidBatch   a batch's size, or a run's ``wait`` in it, is not allowed (422)
├── InvalidQuery       a run listing's parameter (cursor, status, time, limit) is not allowed (422)
├── SecretDenied       a run asks for a secret that does not exist or its key may not use (403)
├── SourceDenied       a run asks for a data source that does not exist or its key may not use (403)
├── QueueFull          the queue holds as many runs as it may (429)
│   └── KeyBusy        the run's API key has as many runs queued or running as it may (429)
├── Throttled          a client sends faster than its rate, or has as many requests in flight as it may (429)
├── ShuttingDown       the server is stopping and takes no new runs (503)
├── RunNotFound        no run has this id, or its result has expired (404)
├── NoSuchFile         the run left no file at this path, or has not ended (404)
├── RunFinished        a finished run cannot be cancelled (409)
├── KeyReused          an Idempotency-Key already names a run asked for with another request (422)
└── StoreError         the run store cannot be opened or used
"""

from __future__ import annotations


class WarmpodError(Exception):
    """Base of every error warmpod raises on purpose."""


class SettingsError(WarmpodError):
    """Raised when the configuration cannot be parsed or is inconsistent."""


class EngineError(WarmpodError):
    """Raised when Podman cannot be reached or refuses a call."""


class ImageError(WarmpodError):
    """Raised when the runner image is missing and cannot be built."""


class PoolUnavailable(WarmpodError):
    """Raised when no container became free within the acquire timeout."""

    retry_after: int = 1


class ProtocolError(WarmpodError):
    """Raised when a container sends a frame that breaks the agent protocol."""


class InvalidRun(WarmpodError):
    """Raised when a run request asks for something the server does not allow."""


class InvalidFile(InvalidRun):
    """Raised when an input file breaks a path rule, is not base64, or goes past a cap."""


class InvalidProgram(InvalidRun):
    """Raised when a run's entrypoint, an argument or an environment variable breaks a rule;
    the message names the rule and the name."""


class InvalidLabel(InvalidRun):
    """Raised when a run's labels (or a ``/runs`` filter's) break a rule: their count, a name's
    characters or length, a value's length or characters; the message names the rule."""


class InvalidCallback(InvalidRun):
    """Raised when a webhook's URL may not be used: malformed, outside ``WARMPOD_WEBHOOKS__ALLOW``
    (or webhooks are off), or, at delivery, resolving to an address the allow-list does not name."""


class InvalidBatch(InvalidRun):
    """Raised when a batch of runs holds none, more than the server takes at once or than could
    ever fit its queue or its key's quota, or a run in it asks to be waited for."""


class InvalidQuery(WarmpodError):
    """Raised when a ``/runs`` query is not one the server answers: a bad cursor, status, time or
    limit; the message names the parameter."""


class SecretDenied(WarmpodError):
    """Raised when a run asks for a secret that is not in the secrets file or that its key may not
    use; the message names the secret, never its value."""


class SourceDenied(WarmpodError):
    """Raised when a run asks for a data source that is not in the sources file or that its key may
    not use; the message names the source."""


class UnknownEnvironment(InvalidRun):
    """Raised when a run names an environment the server does not declare; the message lists those it does."""


class EnvironmentDenied(WarmpodError):
    """Raised when a run names an environment its key may not use."""


class QueueFull(WarmpodError):
    """Raised when a run is submitted while the queue holds as many runs as it may."""

    retry_after: int = 1


class KeyBusy(QueueFull):
    """Raised when a run is submitted with a key that has ``max_active`` runs queued or running."""


class Throttled(WarmpodError):
    """Raised when a client (its API key, or its address where keys are off) sends requests faster
    than its rate, or has as many in flight as it may."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        """Seconds until the client may send again."""


class ShuttingDown(WarmpodError):
    """Raised when a run is submitted or waited on while the server stops."""

    retry_after: int = 5


class RunNotFound(WarmpodError):
    """Raised when no run has the given id, or its result has expired."""


class NoSuchFile(WarmpodError):
    """Raised when a run's file is asked for that it did not leave (or not yet)."""


class RunFinished(WarmpodError):
    """Raised when a run that has already ended is asked to stop."""


class KeyReused(WarmpodError):
    """Raised when a submit's ``Idempotency-Key`` already names a run of its API key that was asked
    for with a different request."""


class StoreError(WarmpodError):
    """Raised when the run store cannot be opened or used."""

    retry_after: int = 5
