"""The files the UI's pages load: ours (``static/``) and the npm packages that setup.sh
installs into ``node_modules/`` (``npm ci``; none of them is copied into the repository).

A fixed table of names, read once: nothing under these directories is reachable by a path
the browser chooses. The login page's own assets are the only ones served without a
session.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import FailedPrecondition

HERE = Path(__file__).resolve().parent
# the npm packages: node_modules beside this file, or (an installed package) the directory
# packaging/ puts them in
MODULE_DIRS = (HERE / "node_modules", Path("/usr/share/appliance/ui/node_modules"))

# name -> (where, path under it, served before login)
TABLE: dict[str, tuple[str, str, bool]] = {
    "pico.css": ("npm", "@picocss/pico/css/pico.min.css", True),
    "app.css": ("static", "app.css", True),
    "favicon.svg": ("static", "favicon.svg", True),
    "htmx.js": ("npm", "htmx.org/dist/htmx.min.js", False),
    "app.js": ("static", "app.js", False),
}
TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".svg": "image/svg+xml"}


@dataclass(frozen=True)
class Asset:
    name: str
    body: bytes
    media_type: str
    etag: str
    public: bool

    @property
    def version(self) -> str:
        """What names this content in the pages' URLs (``?v=``)."""
        return self.etag.strip('"')[:12]


def modules_dir() -> Path:
    for candidate in MODULE_DIRS:
        if (candidate / "htmx.org").is_dir():
            return candidate
    raise FailedPrecondition(
        f"the web UI's npm packages are not installed (looked in "
        f"{', '.join(str(d) for d in MODULE_DIRS)}): run ./setup.sh, or 'npm ci' in {HERE}")


def load() -> dict[str, Asset]:
    """Blocking: every asset, read into memory."""
    modules = modules_dir()
    assets = {}
    for name, (where, relative, public) in TABLE.items():
        path = (modules if where == "npm" else HERE / "static") / relative
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        assets[name] = Asset(name, body, TYPES[path.suffix], etag, public)
    return assets
