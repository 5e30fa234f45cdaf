"""The engine's way to its volume's witness: the node daemon's API on this node
(``GET``/``PUT /v1/witness/VOLUME``, docs/node-api.md), which keeps the record in the
cluster store (docs/membership.md, "The witness").

A request that cannot be answered (the daemon restarts, the store has no quorum) is tried
again until *wait* seconds have passed, then :class:`~appliance.errors.Unavailable` is
raised; the roster fences the engine on that when it was shrinking its member set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

from appliance.errors import ApplianceError, Conflict, Unavailable
from appliance.replication.witness import Witnessed

log = logging.getLogger(__name__)
RETRY_PAUSE = 0.5  # seconds between tries of an unanswered request


class HttpWitness:
    def __init__(self, url: str, token_file: Path, volume: str, wait: float) -> None:
        self.url = url
        self.token_file = token_file
        self.volume = volume
        self.wait = wait

    def read(self) -> Witnessed:
        answer = self._request("GET", None)
        return Witnessed(int(answer["revision"]), int(answer["generation"]),
                         frozenset(answer["members"]))

    def record(self, revision: int, generation: int, members: Iterable[str]) -> int:
        answer = self._request("PUT", {"revision": revision, "generation": generation,
                                       "members": sorted(members)})
        return int(answer["revision"])

    def _request(self, method: str, body: Any) -> Any:
        deadline = time.monotonic() + self.wait
        path = f"/v1/witness/{self.volume}"
        warned = False
        while True:
            try:
                token = self.token_file.read_text().strip()
                response = httpx.request(method, self.url + path, json=body,
                                         timeout=max(1.0, deadline - time.monotonic()),
                                         headers={"Authorization": f"Bearer {token}"})
            except (OSError, httpx.HTTPError) as exc:
                problem = f"cannot reach the node daemon at {self.url}: {exc}"
            else:
                if response.status_code == 200:
                    return response.json()
                message = _message(response)
                if response.status_code == 409:
                    raise Conflict(message)
                if response.status_code not in (401, 503) and response.status_code < 500:
                    raise ApplianceError(f"the witness refused: {message}")
                problem = message  # 401: the daemon writes its token file as it starts
            if time.monotonic() >= deadline:
                raise Unavailable(f"the witness of volume {self.volume} did not answer within "
                                  f"{self.wait:g} s: {problem}")
            if not warned:
                log.warning("volume %s: the witness did not answer (%s); trying again for "
                            "up to %g s", self.volume, problem, self.wait)
                warned = True
            time.sleep(RETRY_PAUSE)


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"
