"""Typed errors: one class per rejection code (the codes of `RejectCode` in `schemas/`), and
one per way a task can fail after it was accepted."""

from __future__ import annotations


class SundaraError(Exception):
    """Anything Sundara refused or could not do."""


class Rejected(SundaraError):
    """Ingress refused the submission; `code` is its stable reject code."""

    code = "rejected"

    def __init__(self, reason: str, code: str | None = None):
        super().__init__(f"{code or self.code}: {reason}")
        self.reason = reason
        if code is not None:
            self.code = code

    @staticmethod
    def of(code: str, reason: str) -> "Rejected":
        """The error of `code` (a plain `Rejected` for a code this client does not know)."""
        cls = REJECTIONS.get(code)
        return cls(reason) if cls else Rejected(reason, code)


class RetryLater(Rejected):
    """A refusal that a later retry may not get: the fleet or the tenant is at a limit."""


def _rejection(name: str, code: str, base: type = Rejected) -> type:
    return type(name, (base,), {"code": code, "__doc__": f"Rejected: `{code}`."})


Malformed = _rejection("Malformed", "malformed")
UnsupportedVersion = _rejection("UnsupportedVersion", "unsupported_version")
PayloadTooLarge = _rejection("PayloadTooLarge", "payload_too_large")
InvalidName = _rejection("InvalidName", "invalid_name")
UnknownModel = _rejection("UnknownModel", "unknown_model")
MissingInput = _rejection("MissingInput", "missing_input")
UnexpectedInput = _rejection("UnexpectedInput", "unexpected_input")
WrongDtype = _rejection("WrongDtype", "wrong_dtype")
WrongShape = _rejection("WrongShape", "wrong_shape")
HostileShape = _rejection("HostileShape", "hostile_shape")
ModelTooLarge = _rejection("ModelTooLarge", "model_too_large")
PriorityNotPermitted = _rejection("PriorityNotPermitted", "priority_not_permitted")
TimeoutTooShort = _rejection("TimeoutTooShort", "timeout_too_short")
Internal = _rejection("Internal", "internal")
Overloaded = _rejection("Overloaded", "overloaded", RetryLater)
RateLimited = _rejection("RateLimited", "rate_limited", RetryLater)
TooManyInFlight = _rejection("TooManyInFlight", "too_many_in_flight", RetryLater)
StorageQuota = _rejection("StorageQuota", "storage_quota", RetryLater)

#: Reject code → its error class.
REJECTIONS: dict[str, type] = {
    cls.code: cls
    for cls in [Malformed, UnsupportedVersion, PayloadTooLarge, InvalidName, UnknownModel, MissingInput,
                UnexpectedInput, WrongDtype, WrongShape, HostileShape, ModelTooLarge, PriorityNotPermitted,
                TimeoutTooShort, Internal, Overloaded, RateLimited, TooManyInFlight, StorageQuota]
}


class TaskFailed(SundaraError):
    """An accepted task ended without a verified result: `code` is `no_consensus` (its
    miners did not agree) or `expired` (its deadline passed before it could run)."""

    def __init__(self, task_id: str, code: str, reason: str):
        super().__init__(f"task {task_id}: {code}: {reason}")
        self.task_id, self.code, self.reason = task_id, code, reason


class ResultTimeout(SundaraError):
    """No result within the time the caller waited (the task may still end later)."""


class JobRefused(SundaraError):
    """The jobs service refused a job request: `code` is `not_found`, `bad_request`,
    `unknown_model`, `wrong_state`, `too_large`, `too_many_jobs` or `unavailable`."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


class JobEnded(SundaraError):
    """A followed job ended other than done: `state` is `failed`, `cancelled` or `expired`."""

    def __init__(self, job_id: str, state: str, reason: str):
        super().__init__(f"job {job_id} {state}: {reason}")
        self.job_id, self.state, self.reason = job_id, state, reason
