"""Sundara's Python client: submit tensors to the verified pipeline over NATS and get back
results its miners agreed on. See docs/clients.md."""

from .client import Client, SyncClient
from .errors import REJECTIONS, JobEnded, JobRefused, Rejected, SundaraError, TaskFailed
from .wire import Result, Tensor

__all__ = [
    "Client", "SyncClient", "Rejected", "REJECTIONS", "SundaraError", "TaskFailed", "JobRefused", "JobEnded", "Result",
    "Tensor",
]
