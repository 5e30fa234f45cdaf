"""What every page and action of the UI shares: the session check, CSRF and origin
checks, security headers, forms, rendering and messages."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import jinja2
import trio
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance import __version__
from appliance.errors import ApplianceError, InvalidArgument
from appliance.ui import views
from appliance.ui.api import Api
from appliance.ui.sessions import COOKIE, Session, Sessions

log = logging.getLogger(__name__)
PREFIX = "/ui"
TEMPLATES = Path(__file__).resolve().parent / "templates"
MAX_FORM = 1 << 20  # bytes of a form body (a credentials file is the largest field)
ELEMENT_ID = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,80}")
FAILED_LOGIN_DELAY = 1.0  # seconds a refused login waits: guessing stays slow

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),  # "no-referrer" would make POSTs carry "Origin: null"
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]

Handler = Callable[["Ui", Request, Session], Awaitable[Response]]


class SecurityHeaders:
    """ASGI middleware: every answer of the UI carries the headers above; pages are not
    cached (an asset sets its own Cache-Control)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [h for h in HEADERS if h[0] not in present]
                if b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def same_origin(request: Request) -> bool:
    """False when the browser says the request came from another origin. A browser that
    sends fetch metadata says it in Sec-Fetch-Site (``none``: typed or bookmarked); one
    that does not sends an Origin with a POST, whose host must be the one asked (the Host
    header, or X-Forwarded-Host behind a proxy; the scheme is not compared, a TLS proxy
    changes it). A request with neither is not a browser's: its CSRF token decides."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return True
    asked = {request.headers.get("host"), request.headers.get("x-forwarded-host")}
    return urlsplit(origin).netloc in asked - {None, ""}


def is_https(request: Request) -> bool:
    """Served over TLS, here or by a proxy in front that says so."""
    return request.url.scheme == "https" or \
        request.headers.get("x-forwarded-proto", "").lower() == "https"


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def is_poll(request: Request) -> bool:
    """A live part refreshing itself (htmx, ``?part=``), not the operator's doing."""
    return is_htmx(request) and "part" in request.query_params


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form (what every form of the UI sends); a field given twice keeps
    its last value, except that list fields are joined with commas."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind != "application/x-www-form-urlencoded":
        raise InvalidArgument(f"a form is expected (application/x-www-form-urlencoded), "
                              f"not {kind or 'no content type'}")
    body = b""
    async with aclosing(request.stream()) as chunks:
        async for chunk in chunks:
            body += chunk
            if len(body) > MAX_FORM:
                raise InvalidArgument(f"the form is larger than {MAX_FORM} bytes")
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False,
                          max_num_fields=500)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument(f"the form cannot be read: {exc}") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        form[key] = f"{form[key]},{value}" if key in form and key.endswith("[]") else value
    return form


def safe_next(target: str | None) -> str:
    """A place in the UI to go back to: a path under /ui/ only (never another site)."""
    if target and target.startswith(PREFIX + "/") and not target.startswith("//") \
            and "\\" not in target and "\n" not in target and "\r" not in target:
        return target
    return PREFIX + "/"


def url_part(value: str) -> str:
    return quote(value, safe="")


class Ui:
    def __init__(self, api: Api, token: str, node_name: str) -> None:
        self.api = api
        self.token = token  # what the login form's field is compared with
        self.node_name = node_name
        self.sessions = Sessions()
        # (session, volume) -> (when, the engine's I/O counters then)
        self.io_samples: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
            trim_blocks=True, lstrip_blocks=True,  # an optional field absent: empty
            auto_reload=False)  # no stat() of the template file at each render
        self.env.filters.update(size=views.size, size_input=views.size_input, ago=views.ago,
                                duration=views.duration,
                                rate=views.rate, url=url_part,
                                volume_class=views.volume_class)
        self.env.globals.update(prefix=PREFIX, version=__version__)

    # -- rendering ----------------------------------------------------------------------

    def render(self, request: Request, session: Session | None, template: str,
               status: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("section", "")
        context.setdefault("title", "")
        text = self.env.get_template(template).render(
            request=request, session=session, csrf=session.csrf if session else "",
            flashes=session.take_flashes() if session else [], node_name=self.node_name,
            **context)
        return HTMLResponse(text, status_code=status)

    def fragment(self, macro: str, **kwargs: Any) -> HTMLResponse:
        """One macro of parts.html: the part of a page that a poll refreshes."""
        module = self.env.get_template("parts.html").module
        return HTMLResponse(str(getattr(module, macro)(**kwargs)))

    # -- the wrapper of every page and action -------------------------------------------

    def guarded(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """A page or action that needs a session; a POST also needs the session's CSRF
        token and a same-origin request."""

        async def endpoint(request: Request) -> Response:
            session = self.sessions.get(request.cookies.get(COOKIE),
                                        touch=not is_poll(request))
            if session is None:
                return self.to_login(request)
            if request.method == "POST":
                refusal = await self.refusal(request, session)
                if refusal is not None:
                    return refusal
            if not is_poll(request):
                return await handler(self, request, session)
            try:
                return await handler(self, request, session)
            except ApplianceError as exc:  # the part says so, and keeps asking
                return self.part_problem(request, exc.message)

        return endpoint

    async def refusal(self, request: Request, session: Session) -> Response | None:
        """Why a POST is refused: another origin, or not the session's CSRF token."""
        if not same_origin(request):
            return self.forbidden(request, session, "a request from another site was refused")
        offered = request.headers.get("x-csrf-token")
        if offered is None:
            try:
                form = await read_form(request)
            except ApplianceError as exc:
                return self.forbidden(request, session, exc.message)
            request.state.form = form
            offered = form.get("csrf")
        if not session.csrf_matches(offered):
            return self.forbidden(request, session, "the form is out of date (its security "
                                  "token does not match): reload the page and try again")
        return None

    def part_problem(self, request: Request, message: str) -> Response:
        """A live part whose refresh failed (a restore under way, a volume gone, a target
        that does not answer): the reason in its place, asked again in 5 seconds."""
        target = request.headers.get("hx-target", "")
        if not ELEMENT_ID.fullmatch(target):
            return Response(status_code=204)  # htmx leaves the page as it is
        return self.fragment("part_problem", id=target, message=message,
                             url=request.url.path + "?" + request.url.query)

    def to_login(self, request: Request) -> Response:
        if is_htmx(request):  # back to the page the poll was on, after the login
            page = urlsplit(request.headers.get("hx-current-url", ""))
            back_to = safe_next(page.path + (f"?{page.query}" if page.query else ""))
            return Response(status_code=401, headers={
                "HX-Redirect": f"{PREFIX}/login?next={quote(back_to, safe='')}"})
        if request.method != "GET":
            return self.render(request, None, "login.html", status=401,
                               error="Your session has ended: log in again.", next="")
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{PREFIX}/login?next={quote(target, safe='')}", 303)

    def forbidden(self, request: Request, session: Session, message: str) -> Response:
        log.info("UI request refused (%s %s): %s", request.method, request.url.path, message)
        return self.render(request, session, "error.html", status=403, title="Refused",
                           message=message)


async def form_of(request: Request) -> dict[str, str]:
    """The form a guarded POST came with (read by the CSRF check, or now)."""
    form = getattr(request.state, "form", None)
    if form is None:
        form = await read_form(request)
        request.state.form = form
    return dict(form)


def back(target: str) -> RedirectResponse:
    return RedirectResponse(safe_next(target), 303)


async def act(session: Session, target: str, action: Awaitable[Any], done: str
              ) -> RedirectResponse:
    """Do *action*; the outcome becomes a message on the page at *target*."""
    try:
        await action
    except ApplianceError as exc:
        session.flash("error", exc.message)
    else:
        session.flash("ok", done)
    return back(target)


async def slow_refusal() -> None:
    await trio.sleep(FAILED_LOGIN_DELAY)
