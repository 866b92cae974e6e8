"""What a botocore failure means, decided once for every AWS caller on the deploying machine.

The S3 store and the EC2/ASG/ELB clients phrase their own one-line messages (they know the
key, the region, the permission), but which kind of failure it was is decided here only.
The node program keeps its own copy: it imports nothing from the controller.
"""

from __future__ import annotations

from dataclasses import dataclass

CONFLICT = "conflict"  # a conditional write lost (412/409)
DENIED = "denied"  # the credentials lack a permission (403)
BAD_CREDENTIALS = "bad-credentials"  # the credentials themselves were rejected
NO_CREDENTIALS = "no-credentials"
NO_PROFILE = "no-profile"
MISSING = "missing"  # the object/resource is not there (404)
NO_BUCKET = "no-bucket"
UNREACHABLE = "unreachable"  # connect failed, timed out or was closed
SLOW = "slow"  # connected, but the answer timed out
API = "api"  # any other error the service returned
OTHER = "other"

_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_DENIED_CODES = {
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
    "UnauthorizedAccess",
    "Forbidden",
    "403",
    "AllAccessDisabled",
    "AccountProblem",
}
_BADCREDS_CODES = {
    "InvalidClientTokenId",
    "AuthFailure",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "UnrecognizedClientException",
    "InvalidToken",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


@dataclass(frozen=True)
class Failure:
    kind: str
    code: str = ""
    message: str = ""
    operation: str = ""
    status: int | None = None


def classify(exc: BaseException) -> Failure:
    import botocore.exceptions as bex

    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return Failure(NO_CREDENTIALS, message=str(exc))
    if isinstance(exc, bex.ProfileNotFound):
        return Failure(NO_PROFILE, message=str(exc))
    if isinstance(
        exc, (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ConnectionClosedError)
    ):
        return Failure(UNREACHABLE, message=str(exc))
    if isinstance(exc, bex.ReadTimeoutError):
        return Failure(SLOW, message=str(exc))
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = str(err.get("Message") or code).strip()
        op = getattr(exc, "operation_name", "") or ""
        if code == "NoSuchBucket":
            kind = NO_BUCKET
        elif code in _CONFLICT_CODES or status in (409, 412):
            kind = CONFLICT
        elif code in _BADCREDS_CODES:
            kind = BAD_CREDENTIALS
        elif code in _DENIED_CODES or status == 403:
            kind = DENIED
        elif code in _MISSING_CODES or status == 404:
            kind = MISSING
        else:
            kind = API
        return Failure(kind, code, message, op, status)
    if isinstance(exc, bex.BotoCoreError):
        return Failure(API, message=str(exc))
    return Failure(OTHER, message=f"{type(exc).__name__}: {exc}")
