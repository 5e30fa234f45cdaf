"""The API's own documents: the OpenAPI document needs the token like every route but
``/healthz``; there is no documentation UI (``/docs``, ``/redoc``: it would load scripts
from a CDN); a path the API does not have is ``no-route``, never ``not-found``."""

from __future__ import annotations

import httpx

from tests.harness import Node


def test_the_openapi_document_needs_the_token(node: Node) -> None:
    auth = {"Authorization": f"Bearer {node.token_file.read_text().strip()}"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = httpx.get(node.url + "/openapi.json", headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "unauthenticated"
    document = httpx.get(node.url + "/openapi.json", headers=auth).json()
    assert "/v1/volumes" in document["paths"]
    assert "delete" in document["paths"]["/v1/backup-target"]
    assert "/openapi.json" not in document["paths"]


def test_no_documentation_ui(node: Node) -> None:
    auth = {"Authorization": f"Bearer {node.token_file.read_text().strip()}"}
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        for headers in ({}, auth):
            response = httpx.get(node.url + path, headers=headers)
            assert response.status_code == 404, (path, response.text)
            assert response.json()["error"] == {
                "code": "no-route",
                "message": f"no route GET {path} in the appliance node API"}


def test_an_unknown_path_is_not_a_missing_object(node: Node) -> None:
    auth = {"Authorization": f"Bearer {node.token_file.read_text().strip()}"}
    route = httpx.delete(node.url + "/foo/v1/volumes/x", headers=auth)
    assert (route.status_code, route.json()["error"]["code"]) == (404, "no-route")
    thing = httpx.get(node.url + "/v1/volumes/x", headers=auth)
    assert (thing.status_code, thing.json()["error"]["code"]) == (404, "not-found")
