"""Swagger UI at ``/api`` and the document at ``/api-json``, where the original Mlynar (NestJS)
serves them: public like ``/api/openapi.json``, from vendored files only (nothing from the
internet), and working in a real browser under the page's Content-Security-Policy."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from playwright.async_api import async_playwright, expect

from support import Api

TOKEN = "swagger-ui-token-0123456789abcdef"
CHROMIUM = "/usr/bin/chromium"
EXTERNAL = re.compile(r"(?i)\b(?:https?:)?//[a-z0-9.-]+")


async def test_swagger_ui_and_api_json_are_public_and_self_contained(make_service, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    api: Api = await make_service(api_token_file=token_file)
    assert (await api.call("GET", "/api/runs"))[0] == 401  # the API needs the token, these do not

    status, document = await api.call("GET", "/api-json")
    assert status == 200 and document == (await api.call("GET", "/api/openapi.json"))[1]
    assert document["paths"]["/api"]["get"]["security"] == []

    async with api.http.get("/api") as r:
        assert r.status == 200 and r.content_type == "text/html"
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        page = await r.text()
    assert not EXTERNAL.search(page), EXTERNAL.search(page)
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert set(assets) == {"/ui/vendor/swagger-ui.css", "/ui/vendor/swagger-ui-bundle.js", "/ui/swagger-init.js"}
    for asset in assets:
        async with api.http.get(urljoin("/api", asset)) as r:
            assert r.status == 200, asset
            assert r.content_type == ("text/css" if asset.endswith(".css") else "text/javascript"), asset
            if asset == "/ui/swagger-init.js":
                starter = await r.text()
    assert 'url: "/api-json"' in starter and "validatorUrl: null" in starter
    assert not EXTERNAL.search(starter)


async def test_swagger_ui_renders_every_operation_in_a_browser(api: Api) -> None:
    status, document = await api.call("GET", "/api-json")
    operations = sum(len(methods) for methods in document["paths"].values())
    origin = str(api.service.api_url).rstrip("/")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            requested: list[str] = []
            errors: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "favicon" not in m.text
                    and "404" not in m.text else None)
            await page.goto(f"{origin}/api")
            await expect(page.locator(".opblock")).to_have_count(operations, timeout=20_000)
            await expect(page.locator(".info .title")).to_contain_text("Mlynar Events")
        finally:
            await browser.close()
    hosts = {urlsplit(u).netloc for u in requested}
    assert hosts == {urlsplit(origin).netloc}, requested  # the page, its files and the document only
    assert not [e for e in errors if "Content Security Policy" in e], errors
