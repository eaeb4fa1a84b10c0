"""The Python client: ``Client`` and ``AsyncClient`` on httpx and httpx-sse, typed by the server's models."""

from warmpod.client.asynchronous import AsyncClient
from warmpod.client.blocking import Client
from warmpod.client.project import ProjectError, project_files
from warmpod.client.webhooks import WebhookVerificationError, new_secret, verify
from warmpod.client.wire import BatchRun, FileArg, ProblemError, RunOptions
from warmpod.models import (
    FileEvent,
    OutputEvent,
    RunResult,
    RunSummary,
    StatusEvent,
    StreamEvent,
    WebhookEvent,
    WebhookState,
)

__all__ = [
    "AsyncClient",
    "BatchRun",
    "Client",
    "FileArg",
    "FileEvent",
    "OutputEvent",
    "ProblemError",
    "ProjectError",
    "RunOptions",
    "RunResult",
    "RunSummary",
    "StatusEvent",
    "StreamEvent",
    "WebhookEvent",
    "WebhookState",
    "WebhookVerificationError",
    "new_secret",
    "project_files",
    "verify",
]
