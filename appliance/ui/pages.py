"""The UI's pages (GET): each reads what it shows from the API, side by side, and renders
it; ``?part=NAME`` answers one live part of a page (what its poll fetches)."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from appliance.errors import ApplianceError
from appliance.ui import views
from appliance.ui.api import TARGET_TIMEOUT, gather, part
from appliance.ui.core import Ui
from appliance.ui.sessions import Session

EVENTS_SHOWN = 12
IO_SAMPLES = 1000  # I/O samples kept before the stale are dropped


def need(answer: Any) -> Any:
    if isinstance(answer, ApplianceError):
        raise answer
    return answer


def problem(answer: Any) -> str:
    return answer.message if isinstance(answer, ApplianceError) else ""


# -- the dashboard ------------------------------------------------------------------------

async def dashboard_data(ui: Ui) -> dict[str, Any]:
    volumes, nodes, disks, settings, events = await gather(ui.api, [
        "/v1/volumes", "/v1/nodes", "/v1/disks", "/v1/settings", "/v1/events"])
    volumes, nodes = need(volumes), need(nodes)
    rows = views.storage(need(disks), need(settings), ui.node_name)
    degraded = [v["name"] for v in volumes if views.volume_class(v) == "degraded"]
    shown = await gather(ui.api, [f"/v1/volumes/{part(name)}" for name in degraded])
    rebuilding = [r for info in shown if not isinstance(info, ApplianceError)
                  for r in views.rebuilds(info)]
    return {"volumes": volumes, "counts": views.volume_counts(volumes),
            "nodes": nodes, "node_counts": views.node_counts(nodes),
            "storage": rows, "totals": views.storage_totals(rows),
            "rebuilds": rebuilding,
            "events": list(reversed(need(events)[-EVENTS_SHOWN:]))}


async def dashboard(ui: Ui, request: Request, session: Session) -> Response:
    data = await dashboard_data(ui)
    if request.query_params.get("part") == "main":
        return ui.fragment("dashboard_main", d=data)
    return ui.render(request, session, "dashboard.html", section="dashboard",
                     title="Dashboard", d=data)


async def dashboard_backups(ui: Ui, request: Request, session: Session) -> Response:
    """The newest backup of each volume: asked of the backup target, so loaded after the
    dashboard itself."""
    volumes, listing = await gather(ui.api, ["/v1/volumes", "/v1/backups"],
                                    timeout=TARGET_TIMEOUT)
    newest = {} if isinstance(listing, ApplianceError) else \
        views.last_backups(listing["backups"])
    return ui.fragment("last_backups", volumes=need(volumes), newest=newest,
                       problem=problem(listing))


# -- volumes ------------------------------------------------------------------------------

async def volumes(ui: Ui, request: Request, session: Session) -> Response:
    query = request.query_params
    q, kind = query.get("q", "")[:200], query.get("kind", "")
    sort = query.get("sort", "name") if query.get("sort") in views.SORT_KEYS else "name"
    descending = query.get("desc") == "1"
    everything = need(await ui.api.get("/v1/volumes"))
    shown = views.filter_sort(everything, q, kind if kind in views.VOLUME_CLASSES else "",
                              sort, descending)
    listing = {"volumes": shown, "total": len(everything), "q": q, "kind": kind,
               "sort": sort, "desc": descending}
    if query.get("part") == "table":
        return ui.fragment("volume_table", v=listing)
    return ui.render(request, session, "volumes.html", section="volumes", title="Volumes",
                     v=listing)


async def volume_live(ui: Ui, name: str, session: Session) -> dict[str, Any]:
    """The volume's live part; I/O rates since the last sample this session took (each
    open page its own), at least a second apart."""
    info = need(await ui.api.get(f"/v1/volumes/{part(name)}"))
    now = time.monotonic()
    key = (session.id, name)
    io = views.io_figures(info.get("io"), ui.io_samples.get(key), now)
    if info.get("io"):
        held = ui.io_samples.get(key)
        if held is None or now - held[0] >= 1.0:
            ui.io_samples[key] = (now, info["io"])
    if len(ui.io_samples) > IO_SAMPLES:  # pages closed long ago
        for stale in [k for k, (when, _) in ui.io_samples.items() if now - when > 120]:
            del ui.io_samples[stale]
    rebuilding = views.rebuilds(info)
    return {"volume": info, "io": io, "rebuilds": rebuilding,
            "rebuild_done": {r["replica"]: r["done"] for r in rebuilding}}


async def volume_backups(ui: Ui, name: str) -> dict[str, Any]:
    try:
        listing = await ui.api.get("/v1/backups", volume=name, timeout=TARGET_TIMEOUT)
    except ApplianceError as exc:
        return {"backups": [], "problem": exc.message, "running": False}
    backups = sorted(listing["backups"], key=lambda b: str(b.get("created")), reverse=True)
    return {"backups": backups, "problem": "",
            "running": any(b.get("state") == "in-progress" for b in backups)}


async def volume_tree(ui: Ui, name: str) -> list[views.SnapshotNode]:
    return views.snapshot_tree(need(await ui.api.get(
        f"/v1/volumes/{part(name)}/snapshots", head="true")))


async def volume(ui: Ui, request: Request, session: Session) -> Response:
    name = request.path_params["name"]
    wanted = request.query_params.get("part")
    if wanted == "live":
        return ui.fragment("volume_live", l=await volume_live(ui, name, session),
                           csrf=session.csrf)
    if wanted == "tree":
        return ui.fragment("snapshot_tree", name=name, tree=await volume_tree(ui, name),
                           csrf=session.csrf)
    if wanted == "backups":
        return ui.fragment("volume_backups", name=name, b=await volume_backups(ui, name))
    if wanted == "events":
        listing = need(await ui.api.get("/v1/events", volume=name))
        return ui.fragment("volume_events", name=name,
                           events=list(reversed(listing[-EVENTS_SHOWN:])))
    live = await volume_live(ui, name, session)
    snapshots, events, jobs, nodes, scrub = await gather(ui.api, [
        f"/v1/volumes/{part(name)}/snapshots?head=true",
        f"/v1/events?volume={part(name)}", "/v1/jobs", "/v1/nodes",
        f"/v1/volumes/{part(name)}/scrub"])
    return ui.render(
        request, session, "volume.html", section="volumes", title=f"Volume {name}",
        l=live, name=name,
        tree=views.snapshot_tree(snapshots) if not isinstance(snapshots, ApplianceError)
        else [], tree_problem=problem(snapshots),
        scrub=None if isinstance(scrub, ApplianceError) else scrub,
        events=list(reversed(need(events)[-EVENTS_SHOWN:])),
        jobs=[] if isinstance(jobs, ApplianceError) else jobs,
        nodes=[] if isinstance(nodes, ApplianceError) else nodes)


async def volume_new(ui: Ui, request: Request, session: Session,
                     form: dict[str, str] | None = None, error: str = "",
                     status: int = 200) -> Response:
    """The form that creates a volume (empty, a copy of a snapshot, or a restore)."""
    volumes_answer, listing = await gather(ui.api, ["/v1/volumes", "/v1/backups"],
                                           timeout=TARGET_TIMEOUT)
    backups = [] if isinstance(listing, ApplianceError) else [
        b for b in listing["backups"] if b.get("state") == "complete"]
    return ui.render(request, session, "volume_new.html", section="volumes",
                     title="Create a volume", status=status, error=error,
                     form=form or {}, volumes=need(volumes_answer),
                     backups=sorted(backups, key=lambda b: str(b.get("created")),
                                    reverse=True),
                     backup_problem=problem(listing))


# -- nodes, backups, jobs, settings, events -----------------------------------------------

async def nodes_data(ui: Ui) -> dict[str, Any]:
    nodes, disks, settings = await gather(ui.api, ["/v1/nodes", "/v1/disks", "/v1/settings"])
    rows = views.storage(need(disks), need(settings), ui.node_name)
    return {"nodes": need(nodes), "storage": rows, "settings": need(settings)}


async def nodes(ui: Ui, request: Request, session: Session) -> Response:
    data = await nodes_data(ui)
    if request.query_params.get("part") == "storage":
        return ui.fragment("node_storage", n=data)
    return ui.render(request, session, "nodes.html", section="nodes",
                     title="Nodes and disks", n=data)


async def backups(ui: Ui, request: Request, session: Session) -> Response:
    target, listing, volumes_answer = await gather(ui.api, [
        "/v1/backup-target", "/v1/backups", "/v1/volumes"], timeout=TARGET_TIMEOUT)
    by_volume: dict[str, list[dict[str, Any]]] = {}
    if not isinstance(listing, ApplianceError):
        for backup in sorted(listing["backups"], key=lambda b: str(b.get("created")),
                             reverse=True):
            by_volume.setdefault(backup["volume"], []).append(backup)
    data = {"target": need(target), "by_volume": dict(sorted(by_volume.items())),
            "problem": problem(listing),
            "damaged": [] if isinstance(listing, ApplianceError) else listing["problems"],
            "standbys": [v for v in need(volumes_answer) if v.get("standby_of")],
            "running": any(b.get("state") == "in-progress" for bs in by_volume.values()
                           for b in bs)}
    if request.query_params.get("part") == "list":
        return ui.fragment("backup_list", k=data, csrf=session.csrf)
    return ui.render(request, session, "backups.html", section="backups", title="Backups",
                     k=data)


async def restore_form(ui: Ui, request: Request, session: Session,
                       form: dict[str, str] | None = None, error: str = "",
                       status: int = 200) -> Response:
    backup_id = request.path_params["backup"]
    backup = need(await ui.api.get(f"/v1/backups/{part(backup_id)}"))
    return ui.render(request, session, "restore.html", section="backups",
                     title=f"Restore {backup_id}", backup=backup, form=form or {},
                     error=error, status=status)


async def jobs(ui: Ui, request: Request, session: Session) -> Response:
    listing = need(await ui.api.get("/v1/jobs"))
    return ui.render(request, session, "jobs.html", section="jobs", title="Recurring jobs",
                     jobs=listing, form={}, error="")


async def settings(ui: Ui, request: Request, session: Session) -> Response:
    values, definitions = await gather(ui.api, ["/v1/settings", "/v1/settings/definitions"])
    return ui.render(request, session, "settings.html", section="settings", title="Settings",
                     values=need(values), definitions=need(definitions))


async def events(ui: Ui, request: Request, session: Session) -> Response:
    volume = request.query_params.get("volume") or None
    listing = need(await ui.api.get("/v1/events", volume=volume))
    return ui.render(request, session, "events.html", section="events", title="Events",
                     events=list(reversed(listing[-200:])), volume=volume or "")
