"""Exporting an attached volume as an iSCSI target (one LUN) through the node's tgtd.

The LUN's backing store is the volume's local block device (the loop device over the
engine's FUSE file here, ``/dev/nbdX`` where the kernel has ``nbd``), served by tgt's
buffered ``rdwr`` store. Chosen by measurement and by what each store promises
(docs/iscsi.md):

* tgt's ``aio`` store was faster, but it acknowledges SYNCHRONIZE CACHE without doing
  anything, ignores FUA and "completes" UNMAP without unmapping: a write an initiator was
  told is durable would not be. ``rdwr`` turns SYNCHRONIZE CACHE and FUA writes into
  ``fdatasync`` of the device (a flush of every replica through the engine) and UNMAP into
  a punched hole (zeros, through the engine's frontend export).
* ``rdwr`` with direct I/O fails the conformance tests whose transfers tgt makes through
  unaligned buffers (VERIFY, WRITE AND VERIFY, ORWRITE, residuals); buffered, it passes
  what tgt on a plain file passes.

The LUN has 512-byte logical blocks and 4 KiB physical blocks (``lbppbe=3``), reports thin
provisioning (UNMAP), a volatile write cache with FUA (tgt's defaults: an initiator that
needs durability flushes or writes with FUA, as with any disk with a cache), a serial
number derived from the volume, so that an initiator sees the same disk after the target
moved to another node.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import Busy, InvalidArgument, NotFound
from appliance.frontend.tgt import (
    ACCOUNT_EXISTS,
    ACCOUNT_INCOMING,
    ACCOUNT_OUTGOING,
    BINDING_EXISTS,
    GLOBAL_TID,
    MODE_ACCOUNT,
    MODE_DEVICE,
    MODE_TARGET,
    NO_TARGET,
    OP_BIND,
    OP_DELETE,
    OP_NEW,
    OP_STATS,
    OP_UNBIND,
    OP_UPDATE,
    Target,
    Tgt,
    TgtError,
    check_backing,
)
from appliance.secrets import read_private_file, write_secret_file

LUN = 1
IQN_PREFIX = "iqn.2026-12.io.appliance"
MIN_SECRET, MAX_SECRET = 12, 255  # RFC 3720 recommends at least 12 bytes (96 bits)
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,254}")
# RFC 3720 names: no "=" or "," (tgt's request parameters are key=value,...)
_INITIATOR = re.compile(r"(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[A-Za-z0-9.:_-]{1,200})?"
                        r"|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})")
_IQN_PART = re.compile(r"[^a-z0-9.-]")


def check_secret(secret: str, what: str = "CHAP secret") -> str:
    """A CHAP secret: 12 to 255 printable ASCII characters, without spaces or commas
    (tgt's parameter separator)."""
    if not MIN_SECRET <= len(secret) <= MAX_SECRET:
        raise InvalidArgument(f"the {what} must be {MIN_SECRET} to {MAX_SECRET} characters "
                              f"long (it is {len(secret)}); initiators such as Windows also "
                              "accept at most 16")
    if not all(33 <= ord(char) <= 126 and char != "," for char in secret):
        raise InvalidArgument(f"the {what} may hold printable ASCII characters only, without "
                              "spaces or commas")
    return secret


def check_user(user: str, what: str = "CHAP user") -> str:
    if not _USER.fullmatch(user):
        raise InvalidArgument(f"invalid {what} {user!r}: letters, digits and . _ : @ -, "
                              "starting with a letter or digit")
    return user


def check_initiators(initiators: list[str]) -> list[str]:
    for name in initiators:
        if not isinstance(name, str) or not _INITIATOR.fullmatch(name):
            raise InvalidArgument(f"invalid initiator name {name!r}: an iSCSI name such as "
                                  "iqn.1993-08.org.debian:01:abcdef (see the initiator's "
                                  "/etc/iscsi/initiatorname.iscsi)")
    return sorted(set(initiators))


@dataclass(frozen=True)
class Credentials:
    """CHAP: the initiator proves it knows *secret*; with a mutual user and secret the
    target proves it knows *mutual_secret* too."""

    user: str
    secret: str
    mutual_user: str = ""
    mutual_secret: str = ""

    def validate(self) -> Credentials:
        check_user(self.user)
        check_secret(self.secret)
        if bool(self.mutual_user) != bool(self.mutual_secret):
            raise InvalidArgument("mutual CHAP needs both a user and a secret")
        if self.mutual_user:
            check_user(self.mutual_user, "mutual CHAP user")
            check_secret(self.mutual_secret, "mutual CHAP secret")
            if self.mutual_secret == self.secret:
                raise InvalidArgument("the mutual CHAP secret must differ from the CHAP "
                                      "secret (RFC 3720)")
        return self

    def to_json(self) -> str:
        return json.dumps({"user": self.user, "secret": self.secret,
                           "mutual_user": self.mutual_user,
                           "mutual_secret": self.mutual_secret})

    @classmethod
    def from_json(cls, text: str | bytes) -> Credentials:
        value = json.loads(text)
        return cls(str(value["user"]), str(value["secret"]), str(value.get("mutual_user", "")),
                   str(value.get("mutual_secret", "")))

    def __repr__(self) -> str:  # never the secrets
        return f"Credentials(user={self.user!r}, mutual_user={self.mutual_user!r})"


def target_name(cluster: str, volume: str) -> str:
    """The volume's IQN: the cluster's and the volume's names, lower-cased, with characters
    an IQN cannot hold replaced (and then a digest of the name, so that names stay
    distinct)."""
    def part(text: str) -> str:
        cleaned = _IQN_PART.sub("-", text.lower())
        if cleaned != text:
            cleaned += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
        return cleaned
    return f"{IQN_PREFIX}:{part(cluster)}.{part(volume)}"


def serial_number(iqn: str) -> str:
    return hashlib.sha256(iqn.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Export:
    iqn: str
    device: str
    credentials: Credentials
    initiators: tuple[str, ...] = ()


def export(tgt: Tgt, spec: Export) -> Target:
    """Make (or bring up to date) the target of *spec*; idempotent, so that a daemon that
    restarted adopts the target tgtd still serves."""
    check_backing(spec.device)
    tgt.ensure_running()
    target = tgt.targets().get(spec.iqn)
    if target is None:
        tid = tgt.new_target(spec.iqn)
        try:
            _add_lun(tgt, tid, spec)
        except BaseException:
            with contextlib.suppress(TgtError):
                tgt.request(MODE_TARGET, OP_DELETE, tid=tid, force=True)
            raise
    elif LUN not in target.backing:  # made by a daemon that stopped before its LUN
        tid = target.tid
        _add_lun(tgt, tid, spec)
    elif target.backing.get(LUN) != spec.device:
        tid = target.tid
        # the device changed (a reattach): reopen the LUN on the new one
        tgt.request(MODE_DEVICE, OP_UPDATE, f"online=0,path={spec.device}", tid=tid, lun=LUN,
                    what=f"reopen the LUN of {spec.iqn}")
    else:
        tid = target.tid
    _ensure_accounts(tgt, tid, spec.credentials)
    _ensure_acl(tgt, tid, list(spec.initiators))
    return tgt.targets()[spec.iqn]


def _add_lun(tgt: Tgt, tid: int, spec: Export) -> None:
    tgt.request(MODE_DEVICE, OP_NEW, f"path={spec.device},bstype=rdwr",
                tid=tid, lun=LUN, what=f"add the LUN of {spec.iqn}")
    serial = serial_number(spec.iqn)
    tgt.request(MODE_DEVICE, OP_UPDATE,
                f"thin_provisioning=1,lbppbe=3,vendor_id=APPLIANC,product_id=volume,"
                f"product_rev=1,scsi_sn={serial},scsi_id={serial}",
                tid=tid, lun=LUN, what=f"set the LUN of {spec.iqn} up")


def _accounts_file(tgt: Tgt) -> Path:
    return tgt.directory / "accounts.json"


def _account_digests(tgt: Tgt) -> dict[str, str]:
    try:
        value = json.loads(_accounts_file(tgt).read_text())
    except (OSError, ValueError):
        return {}
    return {str(key): str(digest) for key, digest in value.items()} \
        if isinstance(value, dict) else {}


def _digest_key(tgt: Tgt) -> bytes:
    """The node's random key of the accounts' digests (0600, made on first use): a digest
    of a short secret alone could be guessed offline."""
    path = tgt.directory / "accounts.key"
    if not path.exists():
        with contextlib.suppress(FileExistsError):
            write_secret_file(path, os.urandom(32))
    return read_private_file(path, 64)


def _save_digests(tgt: Tgt, digests: dict[str, str]) -> None:
    path = _accounts_file(tgt)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(digests, out)
    temporary.replace(path)


def _ensure_account(tgt: Tgt, user: str, secret: str, *, incoming: bool) -> None:
    """Make tgtd's account *user* hold *secret* (tgtd cannot show a password: a digest of
    each account's secret keyed with the node's key, in a 0600 file, tells whether it
    changed)."""
    digests = _account_digests(tgt)
    digest = hmac.new(_digest_key(tgt), f"{user}\0{secret}".encode(),
                      hashlib.sha256).hexdigest()
    try:
        tgt.request(MODE_ACCOUNT, OP_NEW, f"user={user},password={secret}",
                    what=f"create CHAP account {user}")
    except TgtError as exc:
        if exc.status != ACCOUNT_EXISTS:
            raise
        if digests.get(user) != digest:  # another secret: replace it where it is bound
            holders = [(target.tid, target.outgoing == user)
                       for target in tgt.targets().values()
                       if user in target.accounts or target.outgoing == user]
            tgt.request(MODE_ACCOUNT, OP_DELETE, f"user={user}", what=f"replace {user}")
            tgt.request(MODE_ACCOUNT, OP_NEW, f"user={user},password={secret}",
                        what=f"create CHAP account {user}")
            for tid, outgoing in holders:
                _bind(tgt, tid, user, outgoing=outgoing)
    digests[user] = digest
    _save_digests(tgt, digests)
    if incoming:  # discovery sessions need one of the targets' credentials too
        _bind(tgt, GLOBAL_TID, user, outgoing=False)


def _bind(tgt: Tgt, tid: int, user: str, *, outgoing: bool) -> None:
    try:
        tgt.request(MODE_ACCOUNT, OP_BIND, f"user={user}", tid=tid,
                    ac_dir=ACCOUNT_OUTGOING if outgoing else ACCOUNT_INCOMING,
                    what=f"bind CHAP account {user}")
    except TgtError as exc:
        if exc.status not in (ACCOUNT_EXISTS, BINDING_EXISTS):
            raise


def _ensure_accounts(tgt: Tgt, tid: int, credentials: Credentials) -> None:
    target = next(t for t in tgt.targets().values() if t.tid == tid)
    _ensure_account(tgt, credentials.user, credentials.secret, incoming=True)
    for user in target.accounts:
        if user != credentials.user:
            tgt.request(MODE_ACCOUNT, OP_UNBIND, f"user={user}", tid=tid,
                        ac_dir=ACCOUNT_INCOMING, what=f"unbind CHAP account {user}")
    if credentials.user not in target.accounts:
        _bind(tgt, tid, credentials.user, outgoing=False)
    if target.outgoing and target.outgoing != credentials.mutual_user:
        tgt.request(MODE_ACCOUNT, OP_UNBIND, f"user={target.outgoing}", tid=tid,
                    ac_dir=ACCOUNT_OUTGOING, what="unbind the mutual CHAP account")
    if credentials.mutual_user:
        _ensure_account(tgt, credentials.mutual_user, credentials.mutual_secret,
                        incoming=False)
        if target.outgoing != credentials.mutual_user:
            _bind(tgt, tid, credentials.mutual_user, outgoing=True)
    _drop_unused_accounts(tgt)


def _ensure_acl(tgt: Tgt, tid: int, initiators: list[str]) -> None:
    """Only the initiators named may log in (any, when none is named: CHAP still
    holds)."""
    target = next(t for t in tgt.targets().values() if t.tid == tid)
    wanted = initiators or ["ALL"]
    for entry in target.acl:
        if entry not in wanted:
            key = "initiator-address" if entry == "ALL" or _is_address(entry) \
                else "initiator-name"
            tgt.request(MODE_TARGET, OP_UNBIND, f"{key}={entry}", tid=tid,
                        what=f"remove {entry} from the allowed initiators")
    for entry in wanted:
        if entry not in target.acl:
            key = "initiator-address" if entry == "ALL" else "initiator-name"
            tgt.request(MODE_TARGET, OP_BIND, f"{key}={entry}", tid=tid,
                        what=f"allow initiator {entry}")


def _is_address(entry: str) -> bool:
    return bool(re.fullmatch(r"[0-9.:/\[\]a-fA-F]+", entry)) and not entry.startswith("iqn")


def _drop_unused_accounts(tgt: Tgt) -> None:
    targets = tgt.targets().values()
    used = {user for target in targets for user in target.accounts} | {
        target.outgoing for target in targets if target.outgoing}
    digests = _account_digests(tgt)
    for user in [user for user in digests if user not in used]:
        with contextlib.suppress(TgtError):
            tgt.request(MODE_ACCOUNT, OP_DELETE, f"user={user}", what=f"delete {user}")
        digests.pop(user)
    _save_digests(tgt, digests)


def unexport(tgt: Tgt, iqn: str, *, force: bool = False) -> None:
    """Remove the target *iqn* (nothing to do if it does not exist). Refused while
    initiators are logged in, unless *force* (their sessions end)."""
    if tgt.pid() is None:
        return
    target = tgt.targets().get(iqn)
    if target is None:
        return
    if target.sessions and not force:
        raise Busy(f"initiators are logged in to {iqn}: "
                   + ", ".join(session.initiator for session in target.sessions)
                   + "; log them out first (iscsiadm -m node -T IQN --logout), or use --force")
    try:
        tgt.request(MODE_TARGET, OP_DELETE, tid=target.tid, force=True,
                    what=f"delete target {iqn}")
    except TgtError as exc:
        if exc.status != NO_TARGET:
            raise
    _drop_unused_accounts(tgt)


def sessions(tgt: Tgt, iqn: str) -> list[dict[str, object]]:
    """The initiators logged in to *iqn*."""
    if tgt.pid() is None:
        return []
    target = tgt.targets().get(iqn)
    return [{"initiator": session.initiator, "addresses": session.addresses}
            for session in target.sessions] if target else []


def statistics(tgt: Tgt, iqn: str) -> dict[str, int]:
    """The target's sessions now, and the bytes read and written and the errors of those
    sessions (tgtd counts per session: the counts of a session that ended are gone)."""
    result = {"sessions": 0, "read_bytes": 0, "written_bytes": 0, "errors": 0}
    if tgt.pid() is None:
        return result
    target = tgt.targets().get(iqn)
    if target is None:
        return result
    result["sessions"] = len(target.sessions)
    text = tgt.request(MODE_TARGET, OP_STATS, tid=target.tid, what=f"statistics of {iqn}")
    # "tgt lun sid rd_subm(bytes,cmds) rd_done(bytes,cmds) wr_subm(...) wr_done(...) errs"
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) == 12 and fields[1] == str(LUN):
            result["read_bytes"] += int(fields[5])
            result["written_bytes"] += int(fields[9])
            result["errors"] += int(fields[11])
    return result


def resize(tgt: Tgt, iqn: str, device: str) -> None:
    """Make the LUN of *iqn* report the size its device has now (after the device grew):
    tgtd reads the size when it opens the store, so the LUN is reopened in place; the
    target is offline for that instant, and initiators retry what it refuses (BUSY)."""
    target = tgt.targets().get(iqn)
    if target is None:
        raise NotFound(f"no iSCSI target {iqn}")
    tgt.request(MODE_TARGET, OP_UPDATE, "state=offline", tid=target.tid,
                what=f"take {iqn} offline")
    try:
        tgt.request(MODE_DEVICE, OP_UPDATE, f"online=0,path={device}", tid=target.tid,
                    lun=LUN, what=f"reopen the LUN of {iqn}")
    finally:
        tgt.request(MODE_TARGET, OP_UPDATE, "state=ready", tid=target.tid,
                    what=f"bring {iqn} back")


__all__ = ["LUN", "Credentials", "Export", "check_initiators", "check_secret", "check_user",
           "export", "resize", "serial_number", "sessions", "statistics", "target_name", "unexport"]

