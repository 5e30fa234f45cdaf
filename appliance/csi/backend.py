"""The node daemon as the CSI plugin sees it: the REST API calls it makes, and waits on
volumes with a bound. Blocking (the gRPC server runs each call on a worker thread)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from appliance import apiclient
from appliance.apiclient import ApiClient, RemoteNotFound
from appliance.errors import AlreadyExists, AuthenticationFailed, FailedPrecondition

Info = dict[str, Any]


def _q(value: str) -> str:
    return quote(value, safe="")


class Appliance:
    """One node daemon's API."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client

    def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            return self.client.call(method, path, body)
        except AuthenticationFailed as exc:
            # the plugin's token, not the call's secrets (UNAUTHENTICATED would tell the CO
            # to fix those): the plugin is not ready
            raise FailedPrecondition(f"the node daemon refused the CSI plugin's API token: "
                                     f"{exc.message}; give the daemon's token "
                                     "(--token-file, the Secret appliance-api)") from exc

    # -- this node, the nodes, disks --------------------------------------------------------

    def node(self) -> Info:
        node: Info = self.call("GET", "/v1/node")
        return node

    def node_state(self, name: str) -> str | None:
        """Node *name*'s state (``ready``, ``down``, ``cordoned``), None when unknown."""
        try:
            info: Info = self.call("GET", f"/v1/nodes/{_q(name)}")
        except RemoteNotFound:
            return None
        return str(info["state"])

    def disks(self) -> list[Info]:
        disks: list[Info] = self.call("GET", "/v1/disks")
        return disks

    def settings(self) -> Info:
        settings: Info = self.call("GET", "/v1/settings")
        return settings

    # -- volumes ----------------------------------------------------------------------------

    def volume(self, name: str) -> Info | None:
        try:
            info: Info = self.call("GET", f"/v1/volumes/{_q(name)}")
        except RemoteNotFound:
            return None
        return info

    def volumes(self) -> list[Info]:
        volumes: list[Info] = self.call("GET", "/v1/volumes")
        return volumes

    def create_volume(self, body: Info) -> Info:
        created: Info = self.call("POST", "/v1/volumes", body)
        return created

    def clone(self, source: str, body: Info) -> None:
        self.call("POST", f"/v1/volumes/{_q(source)}/clone", body)

    def restore(self, backup_id: str, body: Info) -> None:
        self.call("POST", f"/v1/backups/{_q(backup_id)}/restore", body)

    def wait_copied(self, name: str, timeout: float) -> None:
        """Wait until volume *name*, being made (and filled by a clone or a restore), is
        usable. A pass of the daemon that failed for good is its error, except that an
        object the daemon found in its way is no "volume already exists" to the caller."""
        try:
            apiclient.wait_for_copy(self.client, name, "making", timeout=timeout)
        except AlreadyExists as exc:
            raise FailedPrecondition(exc.message) from exc

    def delete_volume(self, name: str, timeout: float) -> None:
        """Delete volume *name* (already being deleted: a retry) and wait until it is gone."""
        info = self.volume(name)
        if info is None:
            return
        if not info["deleting"]:
            try:
                self.call("DELETE", f"/v1/volumes/{_q(name)}")
            except RemoteNotFound:
                return
        apiclient.wait_for_volume(self.client, name, lambda v: v is None, "deleting",
                                  timeout=timeout)

    def attach(self, name: str, node: str, timeout: float, *, force: bool = False) -> Info:
        """Attach volume *name* on *node* (*force*: moved from the node it is attached on,
        whose engine is fenced); its description once its device is there."""
        self.call("POST", f"/v1/volumes/{_q(name)}/attach?node={_q(node)}"
                  + ("&force=true" if force else ""))
        info = apiclient.wait_for_volume(
            self.client, name, lambda v: v is None or bool(
                (v["state"] == "attached" and v["device"]) or v["refusal"]),
            "attaching", timeout=timeout)
        if info is None:
            raise RemoteNotFound(f"volume {name!r} was deleted while it was attached")
        if info["refusal"]:
            raise FailedPrecondition(f"volume {name} cannot be served: {info['refusal']}")
        return info

    def detach(self, name: str, timeout: float) -> None:
        try:
            self.call("POST", f"/v1/volumes/{_q(name)}/detach")
        except RemoteNotFound:
            return
        apiclient.wait_for_volume(self.client, name,
                                  lambda v: v is None or v["state"] == "detached",
                                  "detaching", timeout=timeout)

    def expand(self, name: str, size: int) -> Info:
        expanded: Info = self.call("POST", f"/v1/volumes/{_q(name)}/expand", {"size": size})
        return expanded

    # -- snapshots --------------------------------------------------------------------------

    def snapshots(self, volume: str) -> list[Info] | None:
        """The live snapshots of *volume* (none when it does not exist); None when they
        cannot be listed now (a volume being made, moved or deleted; a detached one in a
        cluster, whose replicas are on other nodes)."""
        try:
            layers: list[Info] = self.call("GET", f"/v1/volumes/{_q(volume)}/snapshots")
        except RemoteNotFound:
            return []
        except FailedPrecondition:
            return None
        return [layer for layer in layers if not layer["removed"]]

    def create_snapshot(self, volume: str, name: str, labels: dict[str, str]) -> None:
        self.call("POST", f"/v1/volumes/{_q(volume)}/snapshots",
                  {"name": name, "labels": labels})

    def delete_snapshot(self, volume: str, name: str) -> None:
        try:
            self.call("DELETE", f"/v1/volumes/{_q(volume)}/snapshots/{_q(name)}")
        except RemoteNotFound:
            return

    # -- backups ----------------------------------------------------------------------------

    def backups(self, volume: str | None = None) -> list[Info]:
        path = "/v1/backups" + (f"?volume={_q(volume)}" if volume else "")
        listing: Info = self.call("GET", path)
        backups: list[Info] = listing["backups"]
        return backups

    def backup(self, backup_id: str) -> Info | None:
        try:
            info: Info = self.call("GET", f"/v1/backups/{_q(backup_id)}")
        except RemoteNotFound:
            return None
        return info

    def create_backup(self, volume: str, labels: dict[str, str]) -> Info:
        job: Info = self.call("POST", "/v1/backups", {"volume": volume, "labels": labels})
        return job

    def backup_target_set(self) -> bool:
        return bool(self.call("GET", "/v1/backup-target").get("url"))

    def request_detach(self, name: str) -> None:
        """Ask for volume *name* to be detached, without waiting (its node carries it out
        when it can: one that is down, when it is back)."""
        self.call("POST", f"/v1/volumes/{_q(name)}/detach")

    def delete_backup(self, backup_id: str) -> None:
        try:
            self.call("DELETE", f"/v1/backups/{_q(backup_id)}")
        except RemoteNotFound:
            return
