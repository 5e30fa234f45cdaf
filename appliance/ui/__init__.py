"""The web UI, served by the node daemon at ``/ui/`` (docs/ui.md).

Server-rendered pages (Jinja2) with htmx for live parts; every read and every action goes
through the node's REST API (``api.py``), so the UI can do nothing the API refuses. The
browser holds a session cookie, never the API token (``sessions.py``).
"""
