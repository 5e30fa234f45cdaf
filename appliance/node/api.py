"""The REST API: JSON over HTTP, an ASGI app (FastAPI) served by hypercorn on trio.

Thin: parse and validate the request, call :class:`NodeService`, translate errors once.
Every route but ``/healthz`` needs ``Authorization: Bearer <token>``; the token is the
daemon's (DATA_DIR/token). Errors are ``{"error": {"code": CODE, "message": TEXT}}`` with
the HTTP status of the error's class; a malformed request is 400 (``invalid-argument``), a
path the API does not have 404 ``no-route`` (not ``not-found``: a client must not take a
wrong URL for an object that is gone). The OpenAPI document is at ``/openapi.json``, with
the token too; there is no documentation UI (``/docs`` would load its scripts from a CDN,
and a browser does not send the token).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance import __version__
from appliance.control.objects import setting_definitions
from appliance.errors import ApplianceError, AuthenticationFailed, InvalidArgument
from appliance.frontend.iscsi import Credentials
from appliance.node.backups import BackupService
from appliance.node.browse import BrowseService
from appliance.node.forward import HEADER as FORWARDED
from appliance.node.forward import Forwarding
from appliance.node.nodeinfo import NodeInfo
from appliance.node.recurring import RecurringJobs
from appliance.node.scrubs import ScrubService
from appliance.node.service import NodeService
from appliance.node.standby import StandbyService
from appliance.ui.api import Api as UiApi
from appliance.ui.app import create_app as create_ui
from appliance.units import parse_size


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DiskCreate(Strict):
    path: str = Field(min_length=1, max_length=4096)
    tags: list[str] = Field(default_factory=list, max_length=32)
    node: str | None = Field(default=None, max_length=63,
                             description="the node the disk is on (default: this one)")


class WitnessUpdate(Strict):
    revision: int = Field(ge=0, description="the revision last read (0: none yet)")
    generation: int = Field(ge=0)
    members: list[str] = Field(max_length=32)


class DiskUpdate(Strict):
    tags: list[str] | None = Field(default=None, max_length=32)
    allow_scheduling: bool | None = None
    eviction_requested: bool | None = None
    storage_reserved: int | str | None = Field(default=None,
                                               description="bytes, or a size such as 10G")

    @field_validator("storage_reserved")
    @classmethod
    def _reserved(cls, value: int | str | None) -> int | None:
        return parse_size(value) if isinstance(value, str) else value


class VolumeCreate(Strict):
    name: str = Field(min_length=1, max_length=128)
    size: int | str = Field(description="bytes, or a size such as 10G")
    replicas: int = Field(default=2, ge=1, le=8)
    disk_tags: list[str] = Field(default_factory=list, max_length=32)
    node_tags: list[str] = Field(default_factory=list, max_length=32)
    labels: dict[str, str] = Field(default_factory=dict)
    data_locality: Literal["disabled", "best-effort", "strict-local"] = "disabled"
    node: str | None = Field(default=None, max_length=63,
                             description="strict-local: the node of its replica and engine "
                                         "(default: the node the request came to)")
    access_mode: Literal["rwo", "rwx"] = Field(
        default="rwo", description="rwx: shared read-write over NFS (docs/rwx.md)")

    @field_validator("size")
    @classmethod
    def _size(cls, value: int | str) -> int:
        return parse_size(value) if isinstance(value, str) else value


class VolumeClone(Strict):
    name: str = Field(min_length=1, max_length=128)
    snapshot: str | None = Field(default=None, min_length=1, max_length=128)
    replicas: int | None = Field(default=None, ge=1, le=8)
    labels: dict[str, str] | None = Field(default=None,
                                          description="the clone's (default: the source's)")
    disk_tags: list[str] | None = Field(default=None, max_length=32,
                                        description="the clone's (default: the source's)")


class VolumeExpand(Strict):
    size: int | str = Field(description="bytes, or a size such as 20G")
    resize_fs: bool = False

    @field_validator("size")
    @classmethod
    def _size(cls, value: int | str) -> int:
        return parse_size(value) if isinstance(value, str) else value


class ChapBody(Strict):
    user: str = Field(min_length=1, max_length=255)
    secret: str = Field(min_length=1, max_length=255)
    mutual_user: str = Field(default="", max_length=255)
    mutual_secret: str = Field(default="", max_length=255)


class VolumeAttach(Strict):
    frontend: str = Field(default="blockdev", description="blockdev or iscsi")
    chap: ChapBody | None = Field(default=None, description="iscsi: the volume's own CHAP "
                                                           "credentials (default: the node's)")
    initiators: list[str] = Field(default_factory=list, max_length=64,
                                  description="iscsi: the initiators (IQNs) allowed to log in "
                                              "(default: any that passes CHAP)")


class VolumeShare(Strict):
    allow: list[str] | None = Field(default=None, max_length=64,
                                    description="the clients allowed: addresses or CIDRs "
                                                "(empty: none; absent: kept)")
    read_only: bool | None = Field(default=None, description="absent: kept")
    squash: str | None = Field(default=None, description="root, none or all; absent: kept")


class VolumeSalvage(Strict):
    source: str | None = Field(default=None, alias="from", min_length=1, max_length=300,
                               description="the replica to serve (its name); default: the "
                                           "best reachable member of the newest membership")


class SnapshotCreate(Strict):
    name: str = Field(min_length=1, max_length=128)
    labels: dict[str, str] = Field(default_factory=dict)


class JobCreate(Strict):
    name: str = Field(min_length=1, max_length=40)
    task: str = Field(description="snapshot, snapshot-cleanup, snapshot-delete, backup, "
                      "filesystem-trim or scrub")
    cron: str = Field(min_length=1, max_length=200, description="five cron fields, UTC")
    retain: int = Field(default=1, ge=1, le=250)
    concurrency: int = Field(default=1, ge=1, le=64)
    groups: list[str] = Field(default_factory=list, max_length=32)
    labels: dict[str, str] = Field(default_factory=dict)


class MountCreate(Strict):
    kind: Literal["snapshot", "backup"]
    path: str = Field(min_length=1, max_length=4096, description="an empty directory")
    volume: str = Field(default="", max_length=128, description="kind snapshot")
    snapshot: str = Field(default="", max_length=128, description="kind snapshot")
    backup: str = Field(default="", max_length=128, description="kind backup")


class MountRemove(Strict):
    path: str = Field(min_length=1, max_length=4096)


class StandbyCreate(Strict):
    name: str = Field(min_length=1, max_length=128)
    backup_volume: str = Field(min_length=1, max_length=128)
    replicas: int = Field(default=2, ge=1, le=8)
    disk_tags: list[str] = Field(default_factory=list, max_length=32)
    labels: dict[str, str] = Field(default_factory=dict)


class VolumeJobs(Strict):
    add: list[str] = Field(default_factory=list, max_length=64)
    remove: list[str] = Field(default_factory=list, max_length=64)


class BackupTargetSet(Strict):
    url: str = Field(min_length=1, max_length=2048)
    credentials: str | None = Field(default=None, max_length=65536,
                                    description="the credentials file's content")
    encryption_key: str | None = Field(default=None, min_length=64, max_length=64,
                                       description="32 bytes as 64 hex digits")


class BackupCreate(Strict):
    volume: str = Field(min_length=1, max_length=128)
    snapshot: str | None = Field(default=None, min_length=1, max_length=128)
    labels: dict[str, str] = Field(default_factory=dict)


class BackupRestore(Strict):
    name: str = Field(min_length=1, max_length=128)
    replicas: int | None = Field(default=None, ge=1, le=8)
    labels: dict[str, str] = Field(default_factory=dict)
    disk_tags: list[str] = Field(default_factory=list, max_length=32)


class BackupVerify(Strict):
    volume: str = Field(min_length=1, max_length=128)


class SettingsUpdate(Strict):
    over_provisioning_percentage: int | None = None
    minimal_available_percentage: int | None = None
    replica_soft_anti_affinity: bool | None = None
    replica_node_soft_anti_affinity: bool | None = None
    replica_replenishment_wait: float | None = None
    auto_salvage: bool | None = None
    auto_failover: bool | None = None
    backup_compression: str | None = None
    backup_block_size: int | None = None
    scrub_rate_limit: int | None = None
    standby_poll_interval: float | None = None


_bearer = HTTPBearer(auto_error=False)


async def _authenticated(request: Request, credentials: Annotated[
        HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    token: str = request.app.state.token
    if credentials is None or not hmac.compare_digest(credentials.credentials.encode(),
                                                      token.encode()):
        raise AuthenticationFailed("a valid bearer token is required")


def _error(exc: ApplianceError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthenticationFailed) else None
    return JSONResponse({"error": {"code": exc.code, "message": exc.message}},
                        status_code=exc.http_status, headers=headers)


def _disk_routes(app: FastAPI, service: NodeService, auth: list[Any]) -> None:
    """Disks: list, add, update, remove."""

    @app.get("/v1/disks", dependencies=auth)
    async def list_disks() -> list[dict[str, Any]]:
        return await service.list_disks()

    @app.post("/v1/disks", dependencies=auth, status_code=201)
    async def add_disk(body: DiskCreate) -> dict[str, Any]:
        return await service.add_disk(body.path, body.tags, body.node)

    @app.patch("/v1/disks/{name}", dependencies=auth)
    async def update_disk(name: str, body: DiskUpdate) -> dict[str, Any]:
        return await service.update_disk(name, body.model_dump(exclude_none=True))

    @app.delete("/v1/disks/{name}", dependencies=auth)
    async def remove_disk(name: str) -> dict[str, str]:
        await service.remove_disk(name)
        return {"status": "removed"}


class NodeUpdate(Strict):
    labels: dict[str, str | None] = Field(default_factory=dict, max_length=64,
                                          description="a value of null removes the label")
    tags: list[str] | None = Field(default=None, max_length=32)


def _node_routes(app: FastAPI, service: NodeService, auth: list[Any], token: str) -> None:
    """The nodes of the cluster: list, show, cordon, uncordon, labels and tags; requests
    that belong to another node go there (forward.py)."""
    membership = service.controller.membership
    app.add_middleware(Forwarding, membership=membership, token=token)

    @app.get("/v1/nodes", dependencies=auth)
    async def list_nodes() -> list[dict[str, Any]]:
        return await membership.describe_all()

    @app.get("/v1/nodes/{name}", dependencies=auth)
    async def show_cluster_node(name: str) -> dict[str, Any]:
        return await membership.get(name)

    @app.patch("/v1/nodes/{name}", dependencies=auth)
    async def update_node(name: str, body: NodeUpdate) -> dict[str, Any]:
        return await membership.label(name, body.labels, body.tags)

    @app.post("/v1/nodes/{name}/cordon", dependencies=auth)
    async def cordon_node(name: str) -> dict[str, Any]:
        return await membership.cordon(name, True)

    @app.post("/v1/nodes/{name}/uncordon", dependencies=auth)
    async def uncordon_node(name: str) -> dict[str, Any]:
        return await membership.cordon(name, False)

    @app.post("/v1/nodes/{name}/drain", dependencies=auth, status_code=202)
    async def drain_node(name: str) -> dict[str, Any]:
        return await service.drain_node(name)


def _snapshot_routes(app: FastAPI, service: NodeService, auth: list[Any]) -> None:
    """A volume's snapshots: list, take, revert, remove, purge."""

    @app.get("/v1/volumes/{name}/snapshots", dependencies=auth)
    async def list_snapshots(name: str, head: bool = False) -> list[dict[str, Any]]:
        return await service.list_snapshots(name, head=head)

    @app.post("/v1/volumes/{name}/snapshots", dependencies=auth, status_code=201)
    async def create_snapshot(name: str, body: SnapshotCreate) -> dict[str, Any]:
        return await service.create_snapshot(name, body.name, body.labels)

    @app.post("/v1/volumes/{name}/snapshots/{snapshot}/revert", dependencies=auth)
    async def revert_snapshot(name: str, snapshot: str) -> dict[str, str]:
        await service.revert_snapshot(name, snapshot)
        return {"status": "reverted"}

    @app.delete("/v1/volumes/{name}/snapshots/{snapshot}", dependencies=auth)
    async def delete_snapshot(name: str, snapshot: str) -> dict[str, str]:
        await service.delete_snapshot(name, snapshot)
        return {"status": "removed"}

    @app.post("/v1/volumes/{name}/purge", dependencies=auth)
    async def purge_snapshots(name: str) -> dict[str, str]:
        await service.purge_snapshots(name)
        return {"status": "purged"}

    @app.post("/v1/volumes/{name}/trim", dependencies=auth)
    async def trim_volume(name: str) -> dict[str, Any]:
        return await service.trim_filesystem(name)


def _backup_routes(app: FastAPI, backups: BackupService, auth: list[Any]) -> None:
    """The backup target, backups, restores and verification."""

    @app.get("/v1/backup-target", dependencies=auth)
    async def show_backup_target() -> dict[str, Any]:
        return await backups.show_target()

    @app.put("/v1/backup-target", dependencies=auth)
    async def set_backup_target(body: BackupTargetSet) -> dict[str, Any]:
        return await backups.set_target(body.url, body.credentials, body.encryption_key)

    @app.delete("/v1/backup-target", dependencies=auth)
    async def unset_backup_target() -> dict[str, Any]:
        return await backups.unset_target()

    @app.get("/v1/backups", dependencies=auth)
    async def list_backups(volume: str | None = None) -> dict[str, Any]:
        return await backups.list_backups(volume)

    @app.post("/v1/backups", dependencies=auth, status_code=202)
    async def create_backup(body: BackupCreate) -> dict[str, Any]:
        return await backups.create(body.volume, body.snapshot, body.labels)

    @app.get("/v1/backups/{backup_id}", dependencies=auth)
    async def show_backup(backup_id: str) -> dict[str, Any]:
        return await backups.show(backup_id)

    @app.delete("/v1/backups/{backup_id}", dependencies=auth)
    async def delete_backup(backup_id: str) -> dict[str, Any]:
        return await backups.delete(backup_id)

    @app.post("/v1/backups/{backup_id}/restore", dependencies=auth, status_code=201)
    async def restore_backup(backup_id: str, body: BackupRestore) -> dict[str, Any]:
        return await backups.restore(backup_id, body.name, body.replicas,
                                     labels=body.labels, disk_tags=body.disk_tags)

    @app.post("/v1/backups/{backup_id}/verify", dependencies=auth)
    async def verify_backup(backup_id: str) -> dict[str, Any]:
        return await backups.verify(backup_id, None)

    @app.post("/v1/backup-volumes/verify", dependencies=auth)
    async def verify_backup_volume(body: BackupVerify) -> dict[str, Any]:
        return await backups.verify(None, body.volume)


def _job_routes(app: FastAPI, jobs: RecurringJobs, auth: list[Any]) -> None:
    """Recurring jobs, and the jobs a volume takes part in."""

    @app.get("/v1/jobs", dependencies=auth)
    async def list_jobs() -> list[dict[str, Any]]:
        return await jobs.list_jobs()

    @app.post("/v1/jobs", dependencies=auth, status_code=201)
    async def create_job(body: JobCreate) -> dict[str, Any]:
        return await jobs.create(body.name, body.task, body.cron, retain=body.retain,
                                 concurrency=body.concurrency, groups=body.groups,
                                 labels=body.labels)

    @app.get("/v1/jobs/{name}", dependencies=auth)
    async def show_job(name: str) -> dict[str, Any]:
        return await jobs.show(name)

    @app.delete("/v1/jobs/{name}", dependencies=auth)
    async def delete_job(name: str) -> dict[str, str]:
        await jobs.delete(name)
        return {"status": "deleted"}

    @app.post("/v1/jobs/{name}/run", dependencies=auth, status_code=202)
    async def run_job(name: str) -> dict[str, Any]:
        return await jobs.run_now(name)

    @app.post("/v1/volumes/{name}/jobs", dependencies=auth)
    async def volume_jobs(name: str, body: VolumeJobs) -> dict[str, Any]:
        return await jobs.volume_jobs(name, body.add, body.remove)


def _mount_routes(app: FastAPI, browse: BrowseService, auth: list[Any]) -> None:
    """Snapshots and backups browsed as files on this node."""

    @app.get("/v1/mounts", dependencies=auth)
    async def list_mounts() -> list[dict[str, Any]]:
        return await browse.mounts()

    @app.post("/v1/mounts", dependencies=auth, status_code=201)
    async def create_mount(body: MountCreate) -> dict[str, Any]:
        if body.kind == "snapshot":
            if not body.volume or not body.snapshot:
                raise InvalidArgument("a snapshot mount needs volume and snapshot")
            return await browse.mount_snapshot(body.volume, body.snapshot, body.path)
        if not body.backup:
            raise InvalidArgument("a backup mount needs backup")
        return await browse.mount_backup(body.backup, body.path)

    @app.post("/v1/mounts/umount", dependencies=auth)
    async def remove_mount(body: MountRemove) -> dict[str, Any]:
        return await browse.umount(body.path)


def _standby_routes(app: FastAPI, standby: StandbyService, auth: list[Any]) -> None:
    """Standby (disaster-recovery) volumes."""

    @app.post("/v1/standby-volumes", dependencies=auth, status_code=201)
    async def create_standby(body: StandbyCreate) -> dict[str, Any]:
        return await standby.create(body.name, body.backup_volume, body.replicas,
                                    body.disk_tags, body.labels)

    @app.post("/v1/volumes/{name}/activate", dependencies=auth)
    async def activate_volume(name: str) -> dict[str, Any]:
        return await standby.activate(name)


def create_app(service: NodeService, backups: BackupService, jobs: RecurringJobs,
               scrubs: ScrubService, browse: BrowseService, standby: StandbyService,
               token: str, metrics: Callable[[], Awaitable[bytes]]) -> FastAPI:
    app = FastAPI(title="appliance node API", version=__version__,
                  description="Volumes, disks and settings of one appliance node.",
                  openapi_url=None, docs_url=None, redoc_url=None)  # served below, with auth
    app.state.token = token
    auth = [Depends(_authenticated)]

    @app.exception_handler(ApplianceError)
    async def appliance_error(request: Request, exc: ApplianceError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}"
                             for e in exc.errors())
        return JSONResponse({"error": {"code": "invalid-argument",
                                       "message": f"invalid request: {problems}"}},
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthenticated", 404: "no-route",
                405: "method-not-allowed"}.get(exc.status_code, "invalid-argument")
        message = f"no route {request.method} {request.url.path} in the appliance node API" \
            if exc.status_code == 404 else str(exc.detail)
        return JSONResponse({"error": {"code": code, "message": message}},
                            status_code=exc.status_code, headers=exc.headers)

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok"

    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/metrics", dependencies=auth, response_class=Response)
    async def get_metrics() -> Response:
        return Response(await metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    node_info = NodeInfo(service)

    @app.get("/v1/node", dependencies=auth)
    async def show_node() -> dict[str, Any]:
        return await node_info.describe()

    _disk_routes(app, service, auth)
    _node_routes(app, service, auth, token)

    @app.get("/v1/volumes", dependencies=auth)
    async def list_volumes() -> list[dict[str, Any]]:
        return await service.list_volumes()

    @app.post("/v1/volumes", dependencies=auth, status_code=201)
    async def create_volume(body: VolumeCreate, request: Request) -> dict[str, Any]:
        assert isinstance(body.size, int)
        origin = request.headers.get(FORWARDED) or service.controller.config.node_name
        return await service.create_volume(body.name, body.size, body.replicas,
                                           body.disk_tags, body.labels,
                                           node_tags=body.node_tags,
                                           data_locality=body.data_locality,
                                           node=body.node or origin,
                                           access_mode=body.access_mode)

    @app.get("/v1/volumes/{name}", dependencies=auth)
    async def show_volume(name: str) -> dict[str, Any]:
        return await service.show_volume(name)

    @app.delete("/v1/volumes/{name}", dependencies=auth, status_code=202)
    async def delete_volume(name: str, force: bool = False) -> dict[str, str]:
        await service.delete_volume(name, force=force)
        return {"status": "deleting"}

    @app.post("/v1/volumes/{name}/attach", dependencies=auth, status_code=202)
    async def attach_volume(name: str, node: str | None = None, force: bool = False,
                            body: VolumeAttach | None = None) -> dict[str, Any]:
        body = body or VolumeAttach()
        chap = Credentials(body.chap.user, body.chap.secret, body.chap.mutual_user,
                           body.chap.mutual_secret) if body.chap else None
        return await service.attach(name, node, force=force, frontend=body.frontend,
                                    chap=chap, initiators=body.initiators)

    @app.post("/v1/volumes/{name}/share", dependencies=auth)
    async def share_volume(name: str, body: VolumeShare) -> dict[str, Any]:
        return await service.share(name, body.allow, body.read_only, body.squash)

    @app.get("/v1/volumes/{name}/iscsi", dependencies=auth)
    async def volume_iscsi(name: str, secret: bool = False) -> dict[str, Any]:
        return await service.iscsi(name, secret=secret)

    @app.post("/v1/volumes/{name}/detach", dependencies=auth, status_code=202)
    async def detach_volume(name: str, force: bool = False) -> dict[str, Any]:
        return await service.detach(name, force=force)

    @app.post("/v1/volumes/{name}/clone", dependencies=auth, status_code=201)
    async def clone_volume(name: str, body: VolumeClone) -> dict[str, Any]:
        return await service.clone_volume(name, body.name, body.snapshot, body.replicas,
                                          labels=body.labels, disk_tags=body.disk_tags)

    @app.post("/v1/volumes/{name}/expand", dependencies=auth)
    async def expand_volume(name: str, body: VolumeExpand) -> dict[str, Any]:
        assert isinstance(body.size, int)
        return await service.expand_volume(name, body.size, resize_fs=body.resize_fs)

    @app.post("/v1/volumes/{name}/salvage", dependencies=auth, status_code=202)
    async def salvage_volume(name: str, body: VolumeSalvage | None = None) -> dict[str, Any]:
        return await service.salvage(name, body.source if body else None)

    @app.get("/v1/witness/{name}", dependencies=auth)
    async def read_witness(name: str) -> dict[str, Any]:
        return await service.read_witness(name)

    @app.put("/v1/witness/{name}", dependencies=auth)
    async def record_witness(name: str, body: WitnessUpdate) -> dict[str, Any]:
        return await service.record_witness(name, body.revision, body.generation, body.members)

    @app.get("/v1/events", dependencies=auth)
    async def list_events(volume: str | None = None, after: int = 0) -> list[dict[str, Any]]:
        return await service.list_events(volume, after)

    _snapshot_routes(app, service, auth)
    _job_routes(app, jobs, auth)
    _mount_routes(app, browse, auth)
    _standby_routes(app, standby, auth)

    @app.post("/v1/volumes/{name}/scrub", dependencies=auth, status_code=202)
    async def scrub_volume(name: str) -> dict[str, Any]:
        return await scrubs.start(name)

    @app.get("/v1/volumes/{name}/scrub", dependencies=auth)
    async def show_scrub(name: str) -> dict[str, Any]:
        return await scrubs.show(name)

    _backup_routes(app, backups, auth)

    @app.get("/v1/settings", dependencies=auth)
    async def get_settings() -> dict[str, Any]:
        return await service.settings()

    @app.get("/v1/settings/definitions", dependencies=auth)
    async def get_setting_definitions() -> list[dict[str, Any]]:
        return setting_definitions()

    @app.patch("/v1/settings", dependencies=auth)
    async def update_settings(body: SettingsUpdate) -> dict[str, Any]:
        return await service.update_settings(body.model_dump(exclude_none=True))

    _ui_routes(app, token, service.controller.config.node_name)
    return app


def _ui_routes(app: FastAPI, token: str, node_name: str) -> None:
    """The web UI at /ui/ (docs/ui.md): its requests come back into this app."""

    @app.get("/", include_in_schema=False)
    @app.get("/ui", include_in_schema=False)
    async def to_ui() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    app.mount("/ui", create_ui(UiApi.in_process(app, token), token, node_name))
