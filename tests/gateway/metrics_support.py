"""Reading ``/metrics`` as a test: every sample by name and labels, and bounded waits on them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.waiting import wait_until

Samples = dict[str, float]


def sample_key(name: str, **labels: str) -> str:
    """``name{a="1",b="2"}`` with the labels sorted (``name`` alone without labels)."""
    if not labels:
        return name
    inner = ",".join(f'{key}="{labels[key]}"' for key in sorted(labels))
    return f"{name}{{{inner}}}"


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample_key(sample.name, **sample.labels)] = sample.value
    return samples


def scrape(url: str) -> Samples:
    response = httpx.get(url + "/metrics", timeout=5)
    response.raise_for_status()
    return parse(response.text)


def family(samples: Samples, name: str) -> Samples:
    """The samples of one name (every label set), e.g. every ``sse_disconnects_total``."""
    return {key: value for key, value in samples.items() if key.split("{", 1)[0] == name}


def wait_for(
    url: str, check: Callable[[Samples], bool], timeout: float = 15.0, what: str = ""
) -> Samples:
    """Scrape until ``check`` holds (bounded); the samples that satisfied it."""
    last: list[Samples] = [{}]

    def checked() -> Samples | None:
        try:
            last[0] = scrape(url)
        except httpx.TransportError:  # e.g. a worker that died with the connection queued
            last[0] = {}
        return last[0] if last[0] and check(last[0]) else None

    try:
        samples = wait_until(checked, str(what or check), timeout, step=0.02)
    except AssertionError:
        raise AssertionError(f"never true: {what or check}\n{last[0]}") from None
    assert samples is not None
    return samples


async def await_for(
    url: str, check: Callable[[Samples], bool], timeout: float = 15.0, what: str = ""
) -> Samples:
    """``wait_for`` without blocking the event loop (streams read meanwhile)."""
    return await asyncio.to_thread(wait_for, url, check, timeout, what)
