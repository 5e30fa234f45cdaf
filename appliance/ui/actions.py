"""The UI's actions (POST): each reads its form, makes the API request that does it, and
goes back to a page with the outcome as a message. A destructive action has a page of its
own that asks first (GET), naming what it will destroy."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from appliance.errors import ApplianceError, InvalidArgument
from appliance.ui import pages
from appliance.ui.api import part
from appliance.ui.core import (
    PREFIX,
    Ui,
    act,
    back,
    form_of,
    is_https,
    read_form,
    safe_next,
    same_origin,
    slow_refusal,
)
from appliance.ui.sessions import COOKIE, Session

log = logging.getLogger(__name__)


def words(text: str) -> list[str]:
    """Tags: separated by commas or spaces."""
    return [w for w in text.replace(",", " ").split() if w]


def number(form: dict[str, str], key: str, what: str, default: int | None = None) -> int:
    text = form.get(key, "").strip()
    if not text and default is not None:
        return default
    try:
        return int(text)
    except ValueError:
        raise InvalidArgument(f"{what} must be a whole number, not {text!r}") from None


def volume_path(request: Request) -> str:
    return f"/v1/volumes/{part(request.path_params['name'])}"


def volume_page(request: Request) -> str:
    return f"{PREFIX}/volumes/{part(request.path_params['name'])}"


# -- logging in and out -------------------------------------------------------------------

async def login_page(ui: Ui, request: Request) -> Response:
    target = safe_next(request.query_params.get("next"))
    if ui.sessions.get(request.cookies.get(COOKIE)) is not None:
        return RedirectResponse(target, 303)
    return ui.render(request, None, "login.html", title="Log in", error="", next=target)


async def login(ui: Ui, request: Request) -> Response:
    client = request.client.host if request.client else "?"
    if not same_origin(request):
        log.info("UI login from another site refused (%s)", client)
        return ui.render(request, None, "login.html", status=403, title="Log in",
                         error="A login from another site was refused.", next="")
    try:
        form = await read_form(request)
    except ApplianceError as exc:
        return ui.render(request, None, "login.html", status=400, title="Log in",
                         error=exc.message, next="")
    offered = form.get("token", "").strip()
    target = safe_next(form.get("next"))
    if not offered or not hmac.compare_digest(offered.encode(), ui.token.encode()):
        log.info("UI login refused (%s): not the node's API token", client)
        await slow_refusal()
        return ui.render(request, None, "login.html", status=401, title="Log in",
                         error="That is not this node's API token. It is in the file "
                               "DATA_DIR/token on the node (/var/lib/appliance/token by "
                               "default), readable by root only.", next=target)
    ui.sessions.end(request.cookies.get(COOKIE))  # a session held before: not kept
    session = ui.sessions.create()
    log.info("UI login (%s)", client)
    response = RedirectResponse(target, 303)
    response.set_cookie(COOKIE, session.id, path=PREFIX, httponly=True, samesite="strict",
                        secure=is_https(request))
    return response


async def logout(ui: Ui, request: Request, session: Session) -> Response:
    ui.sessions.end(session.id)
    response = RedirectResponse(f"{PREFIX}/login", 303)
    response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")
    return response


# -- asking first -------------------------------------------------------------------------

def confirm(ui: Ui, request: Request, session: Session, *, title: str, message: str,
            button: str, cancel: str, typed: str = "", error: str = "",
            status: int = 200) -> Response:
    return ui.render(request, session, "confirm.html", title=title, message=message,
                     button=button, cancel=cancel, typed=typed, error=error,
                     action=request.url.path, status=status)


async def volume_delete_page(ui: Ui, request: Request, session: Session,
                             error: str = "", status: int = 200) -> Response:
    name = request.path_params["name"]
    return confirm(ui, request, session, title=f"Delete volume {name}",
                   message=f"Volume {name}, its replicas and all its snapshots will be "
                           "destroyed. Its backups stay on the backup target.",
                   button=f"Delete volume {name}", cancel=volume_page(request), typed=name,
                   error=error, status=status)


async def volume_delete(ui: Ui, request: Request, session: Session) -> Response:
    name = request.path_params["name"]
    form = await form_of(request)
    if form.get("typed", "") != name:
        return await volume_delete_page(ui, request, session, status=400,
                                        error=f"Type the volume's name, {name}, to delete it.")
    try:
        await ui.api.delete(volume_path(request))
    except ApplianceError as exc:
        session.flash("error", exc.message)
        return back(volume_page(request))
    session.flash("ok", f"Volume {name} is being deleted.")
    return back(f"{PREFIX}/volumes")


async def snapshot_revert_page(ui: Ui, request: Request, session: Session) -> Response:
    name, snapshot = request.path_params["name"], request.path_params["snapshot"]
    return confirm(ui, request, session, title=f"Revert {name} to {snapshot}",
                   message=f"Volume {name} will hold what it held when snapshot {snapshot} "
                           "was taken. What was written since its newest snapshot is lost; "
                           "newer snapshots stay, on a branch of their own. The volume must "
                           "be detached.", button=f"Revert to {snapshot}",
                   cancel=volume_page(request))


async def snapshot_revert(ui: Ui, request: Request, session: Session) -> Response:
    snapshot = request.path_params["snapshot"]
    return await act(session, volume_page(request), ui.api.post(
        f"{volume_path(request)}/snapshots/{part(snapshot)}/revert"),
        f"Reverted to snapshot {snapshot}.")


async def snapshot_delete_page(ui: Ui, request: Request, session: Session) -> Response:
    name, snapshot = request.path_params["name"], request.path_params["snapshot"]
    return confirm(ui, request, session, title=f"Delete snapshot {snapshot}",
                   message=f"Snapshot {snapshot} of volume {name} will be removed; its data "
                           "is merged into the next layer when snapshots are purged.",
                   button=f"Delete snapshot {snapshot}", cancel=volume_page(request))


async def snapshot_delete(ui: Ui, request: Request, session: Session) -> Response:
    snapshot = request.path_params["snapshot"]
    return await act(session, volume_page(request), ui.api.delete(
        f"{volume_path(request)}/snapshots/{part(snapshot)}"),
        f"Snapshot {snapshot} deleted.")


# -- volumes ------------------------------------------------------------------------------

async def volume_create(ui: Ui, request: Request, session: Session) -> Response:
    form = await form_of(request)
    name = form.get("name", "").strip()
    try:
        await create_volume(ui, form, name)
    except ApplianceError as exc:
        return await pages.volume_new(ui, request, session, form, exc.message,
                                      exc.http_status)
    session.flash("ok", f"Volume {name} created.")
    return back(f"{PREFIX}/volumes/{part(name)}")


def replicas_of(form: dict[str, str]) -> dict[str, int]:
    """The replicas field when given (empty: the API's default)."""
    return {"replicas": number(form, "replicas", "replicas")} \
        if form.get("replicas", "").strip() else {}


async def create_volume(ui: Ui, form: dict[str, str], name: str) -> None:
    replicas = replicas_of(form)
    source = form.get("source", "empty")
    if source == "empty":
        size = form.get("size", "").strip()
        if not size:
            raise InvalidArgument("give the volume's size, such as 10G")
        await ui.api.post("/v1/volumes", {
            "name": name, "size": size, **replicas,
            "data_locality": form.get("data_locality", "disabled"),
            "access_mode": form.get("access_mode", "rwo")})
        return
    if form.get("size", "").strip():
        raise InvalidArgument("a copy has the size of its source: leave the size empty "
                              "(expand the volume afterwards)")
    if form.get("data_locality", "disabled") != "disabled" or \
            form.get("access_mode", "rwo") != "rwo":
        raise InvalidArgument("data locality and access mode are chosen for a new empty "
                              "volume only; a copy starts with the defaults")
    if source == "snapshot":
        origin = form.get("source_volume", "")
        if not origin:
            raise InvalidArgument("choose the volume to copy")
        await ui.api.post(f"/v1/volumes/{part(origin)}/clone", {
            "name": name, "snapshot": form.get("snapshot", "").strip() or None, **replicas})
    elif source == "backup":
        backup = form.get("backup", "")
        if not backup:
            raise InvalidArgument("choose the backup to restore")
        await ui.api.post(f"/v1/backups/{part(backup)}/restore", {"name": name, **replicas})
    else:
        raise InvalidArgument(f"unknown source {source!r}: empty, snapshot or backup")


async def volume_attach(ui: Ui, request: Request, session: Session) -> Response:
    form = await form_of(request)
    node = form.get("node") or None
    body: dict[str, Any] = {"frontend": form.get("frontend") or "blockdev"}
    path = f"{volume_path(request)}/attach" + (f"?node={part(node)}" if node else "")
    return await act(session, volume_page(request), ui.api.post(path, body),
                     "Attaching the volume.")


async def volume_detach(ui: Ui, request: Request, session: Session) -> Response:
    return await act(session, volume_page(request),
                     ui.api.post(f"{volume_path(request)}/detach"), "Detaching the volume.")


async def volume_expand(ui: Ui, request: Request, session: Session) -> Response:
    form = await form_of(request)
    size = form.get("size", "").strip()
    if not size:
        session.flash("error", "Give the new size, such as 20G.")
        return back(volume_page(request))
    return await act(session, volume_page(request), ui.api.post(
        f"{volume_path(request)}/expand", {"size": size, "resize_fs": "resize_fs" in form}),
        f"Volume expanded to {size}.")


async def snapshot_create(ui: Ui, request: Request, session: Session) -> Response:
    form = await form_of(request)
    name = form.get("name", "").strip() or time.strftime("ui-%Y%m%d-%H%M%S", time.gmtime())
    return await act(session, volume_page(request), ui.api.post(
        f"{volume_path(request)}/snapshots", {"name": name}), f"Snapshot {name} taken.")


async def volume_purge(ui: Ui, request: Request, session: Session) -> Response:
    return await act(session, volume_page(request),
                     ui.api.post(f"{volume_path(request)}/purge"), "Snapshots purged.")


async def backup_create(ui: Ui, request: Request, session: Session) -> Response:
    return await act(session, volume_page(request), ui.api.post(
        "/v1/backups", {"volume": request.path_params["name"]}), "Backup started.")


async def volume_jobs(ui: Ui, request: Request, session: Session) -> Response:
    form = await form_of(request)
    add, remove = form.get("add", "").strip(), form.get("remove", "").strip()
    body = {"add": [add] if add else [], "remove": [remove] if remove else []}
    return await act(session, volume_page(request),
                     ui.api.post(f"{volume_path(request)}/jobs", body),
                     f"Recurring job {add or remove} {'added' if add else 'removed'}.")


async def volume_activate(ui: Ui, request: Request, session: Session) -> Response:
    return await act(session, volume_page(request),
                     ui.api.post(f"{volume_path(request)}/activate"), "Volume activated.")


async def volume_scrub(ui: Ui, request: Request, session: Session) -> Response:
    return await act(session, volume_page(request),
                     ui.api.post(f"{volume_path(request)}/scrub"), "Scrub started.")


# -- nodes and disks ----------------------------------------------------------------------

NODES = f"{PREFIX}/nodes"


async def node_action(ui: Ui, request: Request, session: Session) -> Response:
    node, verb = request.path_params["node"], request.path_params["verb"]
    if verb not in ("cordon", "uncordon", "drain"):
        raise InvalidArgument(f"unknown node action {verb!r}")
    done = {"cordon": "cordoned", "uncordon": "uncordoned", "drain": "being drained"}[verb]
    return await act(session, NODES, ui.api.post(f"/v1/nodes/{part(node)}/{verb}"),
                     f"Node {node} {done}.")


async def node_tags(ui: Ui, request: Request, session: Session) -> Response:
    node = request.path_params["node"]
    form = await form_of(request)
    return await act(session, NODES, ui.api.patch(f"/v1/nodes/{part(node)}", {
        "tags": words(form.get("tags", ""))}), f"Tags of node {node} changed.")


async def disk_add(ui: Ui, request: Request, session: Session) -> Response:
    form = await form_of(request)
    body = {"path": form.get("path", "").strip(), "tags": words(form.get("tags", ""))}
    if form.get("node"):
        body["node"] = form["node"]
    return await act(session, NODES, ui.api.post("/v1/disks", body),
                     f"Disk {body['path']} added.")


def changed(form: dict[str, str], fields: dict[str, Any]) -> dict[str, Any]:
    """The fields whose value the operator changed: the form carries what it showed of
    each as ``shown-NAME``; a value changed elsewhere meanwhile is not undone."""
    return {key: value for key, value in fields.items()
            if form.get(f"shown-{key}") != str(value)}


async def disk_update(ui: Ui, request: Request, session: Session) -> Response:
    disk = request.path_params["disk"]
    form = await form_of(request)
    fields: dict[str, Any] = {
        "tags": ", ".join(words(form.get("tags", ""))),
        "allow_scheduling": "allow_scheduling" in form,
        "eviction_requested": "eviction_requested" in form,
        "storage_reserved": form.get("storage_reserved", "").strip() or "0"}
    body = changed(form, fields)
    if not body:
        session.flash("ok", f"Nothing changed on disk {disk}.")
        return back(NODES)
    if "tags" in body:
        body["tags"] = words(body["tags"])
    return await act(session, NODES, ui.api.patch(f"/v1/disks/{part(disk)}", body),
                     f"Disk {disk} changed: {', '.join(sorted(body))}.")


async def disk_remove_page(ui: Ui, request: Request, session: Session) -> Response:
    disk = request.path_params["disk"]
    return confirm(ui, request, session, title=f"Remove disk {disk}",
                   message=f"Disk {disk} will no longer be used. It must hold no replicas "
                           "(request eviction first); its files are left in place.",
                   button=f"Remove disk {disk}", cancel=NODES)


async def disk_remove(ui: Ui, request: Request, session: Session) -> Response:
    disk = request.path_params["disk"]
    return await act(session, NODES, ui.api.delete(f"/v1/disks/{part(disk)}"),
                     f"Disk {disk} removed.")


# -- backups ------------------------------------------------------------------------------

BACKUPS = f"{PREFIX}/backups"


async def target_set(ui: Ui, request: Request, session: Session) -> Response:
    form = await form_of(request)
    body: dict[str, Any] = {"url": form.get("url", "").strip()}
    if form.get("credentials", "").strip():
        body["credentials"] = form["credentials"]
    if form.get("encryption_key", "").strip():
        body["encryption_key"] = form["encryption_key"].strip()
    return await act(session, BACKUPS, ui.api.put("/v1/backup-target", body),
                     f"Backup target set to {body['url']}.")


async def target_test(ui: Ui, request: Request, session: Session) -> Response:
    try:
        listing = await ui.api.get("/v1/backups")
    except ApplianceError as exc:
        session.flash("error", f"The backup target does not answer: {exc.message}")
    else:
        damaged = len(listing["problems"])
        session.flash("ok", f"The backup target answers: {len(listing['backups'])} "
                            f"backup(s)" + (f", {damaged} damaged object(s)" if damaged else ""))
    return back(BACKUPS)


async def target_unset_page(ui: Ui, request: Request, session: Session) -> Response:
    return confirm(ui, request, session, title="Unset the backup target",
                   message="No backup can be made or restored until a target is set again. "
                           "The backups on the target are left as they are.",
                   button="Unset the backup target", cancel=BACKUPS)


async def target_unset(ui: Ui, request: Request, session: Session) -> Response:
    return await act(session, BACKUPS, ui.api.delete("/v1/backup-target"),
                     "Backup target unset.")


async def backup_restore(ui: Ui, request: Request, session: Session) -> Response:
    backup = request.path_params["backup"]
    form = await form_of(request)
    name = form.get("name", "").strip()
    try:
        await ui.api.post(f"/v1/backups/{part(backup)}/restore",
                          {"name": name, **replicas_of(form)})
    except ApplianceError as exc:
        return await pages.restore_form(ui, request, session, form, exc.message,
                                        exc.http_status)
    session.flash("ok", f"Restoring backup {backup} to volume {name}.")
    return back(f"{PREFIX}/volumes/{part(name)}")


async def backup_delete_page(ui: Ui, request: Request, session: Session) -> Response:
    backup = request.path_params["backup"]
    return confirm(ui, request, session, title=f"Delete backup {backup}",
                   message=f"Backup {backup} will be removed from the backup target; blocks "
                           "no other backup uses are deleted.",
                   button=f"Delete backup {backup}", cancel=BACKUPS)


async def backup_delete(ui: Ui, request: Request, session: Session) -> Response:
    backup = request.path_params["backup"]
    return await act(session, BACKUPS, ui.api.delete(f"/v1/backups/{part(backup)}"),
                     f"Backup {backup} deleted.")


async def standby_create(ui: Ui, request: Request, session: Session) -> Response:
    form = await form_of(request)
    name = form.get("name", "").strip()
    try:
        await ui.api.post("/v1/standby-volumes", {
            "name": name, "backup_volume": form.get("backup_volume", ""),
            "replicas": number(form, "replicas", "replicas", 2)})
    except ApplianceError as exc:
        session.flash("error", exc.message)
        return back(BACKUPS)
    session.flash("ok", f"Standby volume {name} created; it follows "
                        f"{form.get('backup_volume')}.")
    return back(f"{PREFIX}/volumes/{part(name)}")


# -- recurring jobs and settings ----------------------------------------------------------

JOBS = f"{PREFIX}/jobs"


async def job_create(ui: Ui, request: Request, session: Session) -> Response:
    form = await form_of(request)
    name = form.get("name", "").strip()
    try:
        await ui.api.post("/v1/jobs", {
            "name": name, "task": form.get("task", ""), "cron": form.get("cron", "").strip(),
            "retain": number(form, "retain", "retain", 1),
            "concurrency": number(form, "concurrency", "concurrency", 1),
            "groups": words(form.get("groups", ""))})
    except ApplianceError as exc:
        return ui.render(request, session, "jobs.html", section="jobs", status=exc.http_status,
                         title="Recurring jobs", jobs=await ui.api.get("/v1/jobs"), form=form,
                         error=exc.message)
    session.flash("ok", f"Recurring job {name} created.")
    return back(JOBS)


async def job_run(ui: Ui, request: Request, session: Session) -> Response:
    name = request.path_params["job"]
    return await act(session, JOBS, ui.api.post(f"/v1/jobs/{part(name)}/run"),
                     f"Recurring job {name} started.")


async def job_delete_page(ui: Ui, request: Request, session: Session) -> Response:
    name = request.path_params["job"]
    return confirm(ui, request, session, title=f"Delete recurring job {name}",
                   message=f"Job {name} will no longer run. What it made (snapshots, "
                           "backups) stays.", button=f"Delete job {name}", cancel=JOBS)


async def job_delete(ui: Ui, request: Request, session: Session) -> Response:
    name = request.path_params["job"]
    return await act(session, JOBS, ui.api.delete(f"/v1/jobs/{part(name)}"),
                     f"Recurring job {name} deleted.")


async def settings_update(ui: Ui, request: Request, session: Session) -> Response:
    form = await form_of(request)
    definitions = await ui.api.get("/v1/settings/definitions")
    changes: dict[str, Any] = {}
    try:
        for definition in definitions:
            key, kind = definition["name"], definition["type"]
            shown = form.get(f"shown-{key}")
            if shown is None:  # not on the form the operator saw
                continue
            if kind == "bool":
                value: Any = key in form
                if str(value) == shown:
                    continue
            elif key not in form or form[key].strip() == shown:
                continue
            elif kind == "int":
                value = number(form, key, key)
            elif kind == "float":
                try:
                    value = float(form[key])
                except ValueError:
                    raise InvalidArgument(f"{key} must be a number, not {form[key]!r}") \
                        from None
            else:
                value = form[key].strip()
            changes[key] = value
    except ApplianceError as exc:
        session.flash("error", exc.message)
        return back(f"{PREFIX}/settings")
    if not changes:
        session.flash("ok", "Nothing changed.")
        return back(f"{PREFIX}/settings")
    return await act(session, f"{PREFIX}/settings", ui.api.patch("/v1/settings", changes),
                     "Settings changed: " + ", ".join(sorted(changes)) + ".")
