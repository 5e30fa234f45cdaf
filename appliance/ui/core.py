"""What every page and action of the UI shares: the session check, CSRF and origin
checks, security headers, forms, rendering and messages."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
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
    """False when the browser says the request came from another site: Sec-Fetch-Site,
    or an Origin that is not this one (a browser sends one of them with every POST)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    parts = urlsplit(origin)
    return parts.scheme == request.url.scheme and parts.netloc == host


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form (what every form of the UI sends); a field given twice keeps
    its last value, except that list fields are joined with commas."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind != "application/x-www-form-urlencoded":
        raise InvalidArgument(f"a form is expected (application/x-www-form-urlencoded), "
                              f"not {kind or 'no content type'}")
    body = b""
    async for chunk in request.stream():
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
        self.io_samples: dict[str, tuple[float, dict[str, Any]]] = {}
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
            trim_blocks=True, lstrip_blocks=True)  # an optional field absent: empty
        self.env.filters.update(size=views.size, ago=views.ago, duration=views.duration,
                                rate=views.rate, url=url_part,
                                volume_class=views.volume_class)
        self.env.globals.update(prefix=PREFIX, version=__version__)

    # -- rendering ----------------------------------------------------------------------

    def render_text(self, template: str, **context: Any) -> str:
        return self.env.get_template(template).render(**context)

    def render(self, request: Request, session: Session | None, template: str,
               status: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("section", "")
        context.setdefault("title", "")
        text = self.render_text(template, request=request, session=session,
                                csrf=session.csrf if session else "",
                                flashes=session.take_flashes() if session else [],
                                node_name=self.node_name, **context)
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
            session = self.sessions.get(request.cookies.get(COOKIE))
            if session is None:
                return self.to_login(request)
            if request.method == "POST":
                if not same_origin(request):
                    return self.forbidden(request, session, "a request from another site "
                                                            "was refused")
                offered = request.headers.get("x-csrf-token")
                if offered is None:
                    try:
                        form = await read_form(request)
                    except ApplianceError as exc:
                        return self.forbidden(request, session, exc.message)
                    request.state.form = form
                    offered = form.get("csrf")
                if not session.csrf_matches(offered):
                    return self.forbidden(request, session, "the form is out of date (its "
                                          "security token does not match): reload the page "
                                          "and try again")
            return await handler(self, request, session)

        return endpoint

    def to_login(self, request: Request) -> Response:
        if is_htmx(request):
            return Response(status_code=401, headers={"HX-Redirect": f"{PREFIX}/login"})
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
