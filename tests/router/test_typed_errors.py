"""Worker-side rejections are typed across the Ray boundary: a worker's ValueError (the request is
invalid for that instance, e.g. its prompt cannot fit the instance's KV cache) is a 400 with an
OpenAI error body; any other worker exception is a 500."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from ray.exceptions import RayTaskError

from pdserve.router.actor import _call
from pdserve.router.errors import InvalidRequestError, RequestFailedError
from pdserve.types import GenerateRequest, PrefillResult
from tests.router.test_server import OK, make_app, post, run, sse_events

TOO_LONG = "prompt: 9000 tokens do not fit this instance's KV cache"


def _remote_raise(cause: Exception) -> object:
    async def call() -> None:
        raise RayTaskError("prefill", "Traceback ...", cause).as_instanceof_cause()

    return call()


def test_a_workers_value_error_is_invalid_anything_else_internal() -> None:
    with pytest.raises(InvalidRequestError, match="do not fit"):
        run(_call("p0", _remote_raise(ValueError(TOO_LONG))))
    with pytest.raises(RequestFailedError) as info:
        run(_call("p0", _remote_raise(RuntimeError("CUDA error: an illegal memory access"))))
    assert not isinstance(info.value, InvalidRequestError)


@dataclass
class _Rejecting:
    async def prefill(self, req: GenerateRequest) -> PrefillResult:
        raise InvalidRequestError(TOO_LONG)


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_invalid_for_the_instance_is_400(mode: str) -> None:
    app, router, prefills, decodes = make_app(mode)
    for w in prefills:
        w.prefill = _Rejecting().prefill  # type: ignore[method-assign]
    if mode == "colocated":
        async def reject(req, handle):  # noqa: ANN001, ANN202
            raise InvalidRequestError(TOO_LONG)
            yield

        decodes[0].generate = reject  # type: ignore[method-assign]
    r = run(post(app, "/v1/completions", OK))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "do not fit" in err["message"]
    r = run(post(app, "/v1/completions", {**OK, "stream": True}))
    (event,) = sse_events(r.text)
    assert event["error"]["type"] == "invalid_request_error" and "do not fit" in event["error"]["message"]
    assert not router.requests
    assert run(post(app, "/v1/completions", {**OK, "prompt": "fine"})).status_code == 400  # still answering
