"""GET /openapi.json: an OpenAPI 3.1 document listing exactly the routes each app registers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sanic import Sanic

from engine.app import create_app
from engine.config import build_config
from tests.engine.fakes import fake_spec
from tests.engine.test_app import assert_error, serving
from tests.fuzz.live import SERVICES


def registered_routes(app: Sanic) -> set[tuple[str, str]]:
    """(OpenAPI path, method) for every route the app serves; `<name:type>` is `{name}`."""
    app.router.finalize()
    return {
        (re.sub(r"<(\w+)(:[^>]*)?>", r"{\1}", route.uri), method.lower())
        for route in app.router.routes
        for method in route.methods
    }


def documented_routes(document: dict) -> set[tuple[str, str]]:
    return {(path, method) for path, methods in document["paths"].items() for method in methods}


@pytest.mark.parametrize("service", SERVICES)
def test_the_document_lists_exactly_the_registered_routes(tmp_path: Path, service: str) -> None:
    Sanic._app_registry.clear()
    app = create_app(fake_spec(service)[0], build_config({"home": str(tmp_path)}))
    assert documented_routes(app.ctx.openapi) == registered_routes(app)


@pytest.mark.parametrize("service", SERVICES)
def test_each_port_serves_its_document(tmp_path: Path, service: str) -> None:
    with serving(tmp_path, service) as (client, _):
        response = client.get("/openapi.json")[1]
        assert response.status == 200
        document = response.json
        assert document["openapi"] == "3.1.0" and document["info"]["title"] == f"mlxd {service}"
        assert "security" not in document
        for methods in document["paths"].values():
            for operation in methods.values():
                assert {"200", "400", "500"} <= set(operation["responses"])


def test_with_an_api_key_the_document_needs_it_and_says_so(tmp_path: Path) -> None:
    with serving(tmp_path, "embeddings", api_key="k") as (client, _):
        assert_error(client.get("/openapi.json")[1], 401, code="invalid_api_key")
        response = client.get("/openapi.json", headers={"authorization": "Bearer k"})[1]
        document = response.json
        assert document["security"] == [{"bearer": []}, {"apiKey": []}]
        paths = document["paths"]
        assert paths["/health"]["get"]["security"] == [] and "401" not in paths["/health"]["get"]
        assert "401" in paths["/v1/embeddings"]["post"]["responses"]
