"""Per-user notifications behind a login: toasts for one user, filtered by resource on the
server side through topics, with a short-lived token the page refreshes by itself.

Run: ``python examples/notifications/app.py`` and log in as alice or bob.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _launch import Example, run_example
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from starlette.routing import Route

USERS: dict[str, dict[str, Any]] = {
    "alice": {"name": "Alice", "projects": ["apollo", "hermes"]},
    "bob": {"name": "Bob", "projects": ["zeus"]},
}
RESOURCES = ("cluster", "project", "workload")
LEVELS = ("success", "error", "info", "warning")
TOKEN_TTL = float(os.environ.get("NOTIFICATIONS_TOKEN_TTL", "60"))
HERE = Path(__file__).resolve().parent
PAGE = (HERE / "page.html").read_text(encoding="utf-8")
LOGIN = (HERE / "login.html").read_text(encoding="utf-8")


def grants(user: str) -> list[str]:
    """What a user may read: their own topic and their projects' topics."""
    return [f"user:{user}", *(f"project:{p}:*" for p in USERS[user]["projects"])]


def build(example: Example) -> Starlette:
    key = example.jwt_secret.encode()
    app_token = example.token(
        "notifications-app", subscribe=["*"], publish=["user:*", "project:*"], ttl=7 * 86400
    )
    pub = example.async_publisher(app_token)
    lock = asyncio.Lock()  # one HTTP connection: one request at a time

    def sign(user: str) -> str:
        return user + "." + hmac.new(key, user.encode(), hashlib.sha256).hexdigest()[:32]

    def current_user(request: Request) -> str | None:
        user, _, _ = request.cookies.get("session", "").partition(".")
        ok = user in USERS and hmac.compare_digest(sign(user), request.cookies["session"])
        return user if ok else None

    async def index(request: Request) -> HTMLResponse:
        user = current_user(request)
        if user is None:
            return HTMLResponse(LOGIN)
        config = {"gateway": example.gateway_url, "user": user, **USERS[user]}
        config["resources"] = list(RESOURCES)
        body = PAGE.replace("{{name}}", html.escape(USERS[user]["name"])).replace(
            "{{config}}", json.dumps(config).replace("<", "\\u003c")
        )
        return HTMLResponse(body, headers={"cache-control": "no-store"})

    async def login(request: Request) -> RedirectResponse:
        form = parse_qs((await request.body()).decode())  # no form-parsing dependency
        user = form.get("user", [""])[0]
        reply = RedirectResponse("/", status_code=303)
        if user in USERS:
            reply.set_cookie("session", sign(user), httponly=True, samesite="lax")
        return reply

    async def logout(request: Request) -> RedirectResponse:
        reply = RedirectResponse("/", status_code=303)
        reply.delete_cookie("session")
        return reply

    async def token(request: Request) -> PlainTextResponse:
        """A short-lived token for the logged-in user; the page asks again when it expires."""
        user = current_user(request)
        if user is None:
            return PlainTextResponse("log in first", status_code=401)
        tok = example.token(user, subscribe=grants(user), ttl=TOKEN_TTL)
        return PlainTextResponse(tok, headers={"cache-control": "no-store"})

    async def notify(request: Request) -> JSONResponse:
        """Send a notification to a user or to a project's resource. A demo endpoint, open to
        anyone who reaches the app (it listens on loopback): a real app publishes from its own
        code where the change happens."""
        body = await request.json()
        level = body.get("level", "info")
        if level not in LEVELS:
            return JSONResponse({"error": "bad_level", "message": f"one of {LEVELS}"}, 400)
        if "user" in body:
            topic = f"user:{body['user']}"
        else:
            if body.get("resource") not in RESOURCES:
                problem = {"error": "bad_resource", "message": f"one of {RESOURCES}"}
                return JSONResponse(problem, 400)
            topic = f"project:{body['project']}:{body['resource']}"
        data = {"level": level, "title": str(body.get("title", level)), "topic": topic,
                "resource": body.get("resource", "user"), "at": time.time()}  # fmt: skip
        async with lock:
            event_id = await pub.publish(topic, data, event="notification")
        return JSONResponse({"id": event_id, "topic": topic}, status_code=201)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/token", token),
            Route("/api/notify", notify, methods=["POST"]),
        ]
    )


if __name__ == "__main__":
    run_example(build, jwt=True, gateway_args=["--jwt-leeway", "0"])
