"""One classification of botocore failures for the store and the AWS clients."""

from __future__ import annotations

import botocore.exceptions as bex
import pytest

from fabdeploy.adapters import boto


def client_error(code: str, status: int, op: str = "PutObject") -> bex.ClientError:
    return bex.ClientError(
        {
            "Error": {"Code": code, "Message": f"{code} happened"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        op,
    )


@pytest.mark.parametrize(
    "exc,kind",
    [
        (client_error("PreconditionFailed", 412), boto.CONFLICT),
        (client_error("ConditionalRequestConflict", 409), boto.CONFLICT),
        (client_error("AccessDenied", 403), boto.DENIED),
        (client_error("UnauthorizedOperation", 403, "DescribeInstances"), boto.DENIED),
        (client_error("SignatureDoesNotMatch", 403), boto.BAD_CREDENTIALS),
        (client_error("InvalidClientTokenId", 403), boto.BAD_CREDENTIALS),
        (client_error("NoSuchKey", 404), boto.MISSING),
        (client_error("404", 404), boto.MISSING),
        (client_error("NoSuchBucket", 404), boto.NO_BUCKET),
        (client_error("Throttling", 400), boto.API),
        (bex.NoCredentialsError(), boto.NO_CREDENTIALS),
        (bex.EndpointConnectionError(endpoint_url="http://x"), boto.UNREACHABLE),
        (bex.ReadTimeoutError(endpoint_url="http://x"), boto.SLOW),
        (ValueError("x"), boto.OTHER),
    ],
)
def test_classify(exc: BaseException, kind: str) -> None:
    assert boto.classify(exc).kind == kind


def test_the_failure_keeps_the_data_for_the_message() -> None:
    f = boto.classify(client_error("UnauthorizedOperation", 403, "DescribeInstances"))
    assert (f.code, f.operation, f.status, f.message) == (
        "UnauthorizedOperation",
        "DescribeInstances",
        403,
        "UnauthorizedOperation happened",
    )
