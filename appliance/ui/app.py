"""The UI's ASGI app (Starlette), mounted by the API at ``/ui``: the table of its pages and
actions, and its assets."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance.errors import ApplianceError
from appliance.ui import actions, assets, pages
from appliance.ui.api import Api
from appliance.ui.core import PREFIX, Handler, SecurityHeaders, Ui
from appliance.ui.sessions import COOKIE

log = logging.getLogger(__name__)

# (path, page (GET), action (POST)); every one needs a session
GUARDED: list[tuple[str, Handler | None, Handler | None]] = [
    ("/", pages.dashboard, None),
    ("/dashboard/backups", pages.dashboard_backups, None),
    ("/logout", None, actions.logout),
    ("/volumes", pages.volumes, None),
    ("/new-volume", pages.volume_new, actions.volume_create),  # "new" may name a volume
    ("/volumes/{name}", pages.volume, None),
    ("/volumes/{name}/attach", None, actions.volume_attach),
    ("/volumes/{name}/detach", None, actions.volume_detach),
    ("/volumes/{name}/expand", None, actions.volume_expand),
    ("/volumes/{name}/delete", actions.volume_delete_page, actions.volume_delete),
    ("/volumes/{name}/snapshots", None, actions.snapshot_create),
    ("/volumes/{name}/snapshots/{snapshot}/revert", actions.snapshot_revert_page,
     actions.snapshot_revert),
    ("/volumes/{name}/snapshots/{snapshot}/delete", actions.snapshot_delete_page,
     actions.snapshot_delete),
    ("/volumes/{name}/purge", None, actions.volume_purge),
    ("/volumes/{name}/backup", None, actions.backup_create),
    ("/volumes/{name}/jobs", None, actions.volume_jobs),
    ("/volumes/{name}/activate", None, actions.volume_activate),
    ("/volumes/{name}/scrub", None, actions.volume_scrub),
    ("/nodes", pages.nodes, None),
    ("/nodes/{node}/tags", None, actions.node_tags),
    ("/nodes/{node}/{verb}", None, actions.node_action),
    ("/disks", None, actions.disk_add),
    ("/disks/{disk}", None, actions.disk_update),
    ("/disks/{disk}/remove", actions.disk_remove_page, actions.disk_remove),
    ("/backups", pages.backups, None),
    ("/backups/target", None, actions.target_set),
    ("/backups/target/test", None, actions.target_test),
    ("/backups/target/unset", actions.target_unset_page, actions.target_unset),
    ("/backups/{backup}/restore", pages.restore_form, actions.backup_restore),
    ("/backups/{backup}/delete", actions.backup_delete_page, actions.backup_delete),
    ("/standby", None, actions.standby_create),
    ("/jobs", pages.jobs, actions.job_create),
    ("/jobs/{job}/run", None, actions.job_run),
    ("/jobs/{job}/delete", actions.job_delete_page, actions.job_delete),
    ("/settings", pages.settings, actions.settings_update),
    ("/events", pages.events, None),
]


def _either(get: Callable[[Request], Awaitable[Response]] | None,
            post: Callable[[Request], Awaitable[Response]] | None
            ) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        chosen = get if request.method in ("GET", "HEAD") else post
        assert chosen is not None  # the route's methods allow only these
        return await chosen(request)
    return endpoint


def create_app(api: Api, token: str, node_name: str) -> Starlette:
    ui = Ui(api, token, node_name)
    try:
        served = assets.load()
    except (ApplianceError, OSError) as exc:
        message = exc.message if isinstance(exc, ApplianceError) else str(exc)
        log.warning("the web UI has no assets, its pages will look bare: %s", message)
        served = {}

    ui.env.globals["asset"] = lambda name: (
        f"{PREFIX}/assets/{name}?v={served[name].version}" if name in served
        else f"{PREFIX}/assets/{name}")

    async def asset(request: Request) -> Response:
        found = served.get(request.path_params["asset"])
        if found is None:
            raise HTTPException(404)
        if not found.public and ui.sessions.get(request.cookies.get(COOKIE)) is None:
            return Response("log in first", status_code=401, media_type="text/plain")
        # the pages name an asset with its digest (?v=): a new version is a new URL
        versioned = request.query_params.get("v") == found.version
        headers = {"ETag": found.etag, "Cache-Control": "private, max-age=31536000, immutable"
                   if versioned else "private, no-cache"}
        if request.headers.get("if-none-match") == found.etag:
            return Response(status_code=304, headers=headers)
        return Response(found.body, media_type=found.media_type, headers=headers)

    routes = [Route("/login", partial(actions.login_page, ui), methods=["GET"]),
              Route("/login", partial(actions.login, ui), methods=["POST"]),
              Route("/assets/{asset}", asset, methods=["GET"])]
    for path, get, post in GUARDED:
        methods = (["GET"] if get else []) + (["POST"] if post else [])
        routes.append(Route(path, _either(ui.guarded(get) if get else None,
                                          ui.guarded(post) if post else None),
                            methods=methods))

    async def failed(request: Request, exc: Exception) -> Response:
        return _failure(ui, request, exc)

    async def broken(request: Request, exc: Exception) -> Response:
        log.error("UI page %s failed", request.url.path, exc_info=exc)
        return ui.render(request, None, "error.html", status=500, title="Not shown",
                         message="This page failed to render (the node's log has why).")

    return Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)],
                     exception_handlers={ApplianceError: failed, HTTPException: failed,
                                         Exception: broken})


def _failure(ui: Ui, request: Request, exc: Any) -> Response:
    """A page that could not be shown: the API's error (a volume that is gone, a node
    that does not answer) or a path the UI does not have."""
    session = ui.sessions.get(request.cookies.get(COOKIE))
    if isinstance(exc, ApplianceError):
        status, message = exc.http_status, exc.message
    else:
        status = exc.status_code
        message = {404: "There is no such page.",
                   405: "That cannot be done here."}.get(status, str(exc.detail))
    if session is None and status != 404:
        return ui.to_login(request)
    return ui.render(request, session, "error.html", status=status, title="Not shown",
                     message=message)
