"""/docs and /redoc work offline: every asset they load is served by codeserve itself."""

from __future__ import annotations

import re

import pytest


def referenced_urls(html: str) -> list[str]:
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    urls += re.findall(r"""\burl:\s*["']([^"']+)["']""", html)  # the OpenAPI document
    urls += re.findall(r"""<redoc[^>]*spec-url=["']([^"']+)["']""", html)
    return urls


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_reference_only_local_assets_that_answer(client, page):
    r = client.get(page)
    assert r.status_code == 200
    html = r.text
    assert "cdn" not in html.lower()
    urls = referenced_urls(html)
    assert any(u.endswith(".js") for u in urls), urls
    assert any(u == "/openapi.json" for u in urls), urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from afar"
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert asset.content, url


def test_swagger_assets_are_the_real_bundle(client):
    js = client.get("/static-offline-docs/swagger-ui-bundle.js")
    assert js.headers["content-type"].startswith(("application/javascript", "text/javascript"))
    assert "SwaggerUIBundle" in js.text
