"""What ``POST /publish`` adds to a publish: whose idempotency key it is, a pace per publisher,
and answers for the failures that retrying cannot fix."""

from __future__ import annotations

import logging

from gateway.auth import Identity
from gateway.errors import HTTPError, bad_request
from gateway.limits import rate_limiter, retry_after
from publisher.redis_transport import Failure, NotReplicated

log = logging.getLogger("gateway.publish")


class PublishFailed(Exception):
    """A publish the engine refused for good: sending it again cannot succeed until an
    operator acts. ``detail`` is the raw cause, for the log only (it names keys)."""

    def __init__(self, failure: Failure, detail: str) -> None:
        super().__init__(f"{failure}: {detail}")
        self.failure = failure
        self.detail = detail


_ANSWERS: dict[Failure, tuple[int, str]] = {
    Failure.TOPIC_CONFLICT: (
        409,
        "the history of one of these topics holds data of another kind, so nothing was "
        "published; an operator must repair it (other topics are not affected)",
    ),
    Failure.STORAGE_FULL: (
        507,
        "the event store is out of memory and refuses new events; nothing was published",
    ),
    Failure.STORAGE_ERROR: (
        500,
        "the event store refused the publish; the gateway log says why",
    ),
}


def failed_answer(exc: PublishFailed) -> HTTPError:
    """A JSON error without ``Retry-After`` that names no key, script or Redis text."""
    log.error("publish refused (%s): %s", exc.failure, exc.detail)
    status, message = _ANSWERS[exc.failure]
    return HTTPError(status, str(exc.failure), message)


def not_replicated_answer(exc: NotReplicated) -> HTTPError:
    """The event is stored and delivered, only not yet on enough replicas: a retry with the
    same idempotency key returns the same id and waits for them again."""
    log.warning("publish not confirmed by enough replicas: %s", exc)
    return HTTPError(
        503, "not_replicated", str(exc), {"retry-after": "1"},
        id=exc.ids[0], replicas=exc.replicas, wanted=exc.wanted,
    )  # fmt: skip


def idempotency_scope(identity: Identity) -> str:
    """A token subject's keys are its own; anonymous publishers (loopback, or
    ``--allow-remote-publish``) share one scope, apart from direct Redis publishers."""
    subject = identity.subject
    return "anonymous" if subject is None else f"sub:{subject}"


class PublishRate:
    """``--publish-rate`` events per second per token subject, or per client address when
    anonymous, in bursts of twice that (0: unlimited)."""

    def __init__(self, rate: float) -> None:
        self.limiter = rate_limiter(rate)

    def check(self, identity: Identity, address: str | None, events: int = 1) -> None:
        """Each event of a batch counts; a batch larger than the burst could never pass."""
        if self.limiter is None:
            return
        if events > self.limiter.burst:
            raise bad_request(
                "batch_too_large",
                f"at most {int(self.limiter.burst)} events per request at this node's "
                "--publish-rate; send smaller batches",
            )
        subject = identity.subject
        key = f"sub:{subject}" if subject is not None else f"addr:{address or '?'}"
        wait = self.limiter.acquire(key, cost=events)
        if wait:
            who = "subject" if subject is not None else "address"
            raise HTTPError(
                429, "rate_limited",
                f"too many publishes from this {who} (--publish-rate); retry later",
                retry_after(wait),
            )  # fmt: skip
