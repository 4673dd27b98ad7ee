"""A page that follows a stream with a native ``EventSource`` and records what it sees.

The page is served by Playwright at the gateway's (or the balancer's) own origin, so the stream
is same-origin, as on a site that proxies the gateway under its own name."""

from __future__ import annotations

from typing import Any

PAGE = """<!doctype html><meta charset="utf-8"><title>stream</title>
<script>
window.log = {seqs: [], refused: [], trace: [], closedForGood: false};
window.follow = (url) => {
  const source = new EventSource(url);
  window.source = source;
  const trace = (what) => { if (window.log.trace.length < 50) window.log.trace.push(what); };
  source.onopen = () => trace("open");
  source.onerror = () => {
    trace("error");
    if (source.readyState === EventSource.CLOSED) window.log.closedForGood = true;
  };
  source.addEventListener("n", (e) => { window.log.seqs.push(JSON.parse(e.data).seq); });
  source.addEventListener("refused", (e) => {
    trace("refused");
    window.log.refused.push(JSON.parse(e.data).reason);
  });
};
</script>"""


def open_page(context: Any, origin: str, stream_path: str) -> Any:
    """A page at ``origin`` following ``stream_path`` (``/events?...``)."""
    page = context.new_page()
    url = origin + "/page.html"
    page.route(url, lambda route: route.fulfill(body=PAGE, content_type="text/html"))
    page.goto(url)
    page.evaluate("(path) => window.follow(path)", stream_path)
    return page


def log_of(page: Any) -> dict[str, Any]:
    log: dict[str, Any] = page.evaluate("() => window.log")
    return log
