"""The web view at ``/ui`` in a real browser (Debian's Chromium driven by Playwright) against a
real in-process service: what a user does with it, end to end, and what they see.

Why a real browser: the page is plain ES modules talking to the API with fetch and a streamed
SSE body; only a browser runs that code, resolves its module imports, applies the page's
Content-Security-Policy and keeps the DOM that shows the lineage graph. Each test leaves
full-page screenshots in its ``artifacts`` directory (``$MLYNAR_ARTIFACTS`` to keep them).

Synchronisation is Playwright's auto-waiting ``expect`` only: every assertion waits for the page
to get there (SSE updates included), none sleeps.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from mlynar_events.example import run_example

from support import EXAMPLES, REPO, Api

CHROMIUM = "/usr/bin/chromium"
NUMBERS = EXAMPLES / "data" / "numbers.json"
RUN_PAGE = re.compile(r"/ui/#/run/[0-9a-f-]{36}$")
RUN_TIMEOUT_MS = 30_000  # a whole run of the example, with slow CI machines in mind


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (.ci/run installs it)")
    async with async_playwright() as p:
        # Debian's Chromium (browser downloads are impossible here); CI runs as root, hence no sandbox
        b = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh page (its own sessionStorage); fails the test on any script error in the page and
    on anything its Content-Security-Policy blocked (the page must need nothing the CSP forbids)."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    p = await context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    try:
        yield p
    finally:
        await context.close()
    assert not errors, f"script errors in the page: {errors}"


Shot = Callable[[str], Awaitable[None]]

# A closed page's event stream ends at the service's next write to it (a heartbeat), and a
# stopping service waits for it: a short heartbeat keeps the teardown short.
FAST = {"sse_heartbeat": 0.5}


@pytest.fixture
async def api(make_service: Callable[..., Awaitable[Api]]) -> Api:
    return await make_service(**FAST)


@pytest.fixture
def shot(page: Page, artifacts: Path) -> Shot:
    async def take(name: str) -> None:
        await page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)

    return take


def ui(api: Api, fragment: str = "") -> str:
    return f"{api.service.api_url}/ui/{fragment}"


async def test_a_run_from_the_page(api: Api, page: Page, shot: Shot) -> None:
    """Create, upload, start with a parameter, watch it finish live, read a step's logs."""
    await page.goto(f"{api.service.api_url}/ui")
    await expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    await page.get_by_role("button", name="Create run").click()
    await expect(page).to_have_url(RUN_PAGE)
    await expect(page.locator("h1")).to_contain_text(page.url.split("#/run/")[1])
    run_id = page.url.split("#/run/")[1]
    # a marker in this document: if the page reloaded anywhere below, it would be gone
    await page.evaluate("window.__sameDocument = true")

    await page.get_by_label("Data kind").select_option("number-array-json")
    await page.get_by_label("File").set_input_files(NUMBERS)
    await page.get_by_role("button", name="Upload").click()
    nodes = page.locator("#lineage [data-node-id]")
    await expect(nodes).to_have_count(1)
    await expect(page.locator("#pool-table tbody tr")).to_have_count(1)
    # /params: what can run from this pool, reached transitively (average needs sum and length)
    await expect(page.locator("#start-form fieldset")).to_have_count(3)
    await page.locator("#param-sum-MULTIPLY_BY").fill("5")
    await shot("1-run-uploaded")

    await page.get_by_role("button", name="Start").click()
    for operator in ("sum", "length", "average"):
        row = page.locator(f'#steps-table tr[data-operator="{operator}"]')
        await expect(row).to_have_attribute("data-status", "success", timeout=RUN_TIMEOUT_MS)
        await expect(row.locator("td.status")).to_have_text("success")
    # the graph grew from the stream: upload → sum, length → their units → average → its unit
    await expect(nodes).to_have_count(7)
    await expect(page.locator('#lineage [data-node-type="step"][data-status="success"]')).to_have_count(3)
    await expect(page.locator("#lineage path.edge")).to_have_count(7)
    await expect(page.locator("#run-summary .badge")).to_have_text("complete")
    assert await page.evaluate("window.__sameDocument") is True, "the page reloaded"
    await shot("2-run-complete")

    # the parameter the form sent is the one the step ran with
    run = await api.run(run_id)
    sum_unit = next(u for u in run["dataPool"] if u["dataKind"] == "number-array-sum-json")
    assert json.loads(await api.content(sum_unit["url"])) == {"sum": 75}

    await page.locator('#steps-table tr[data-operator="sum"] button.logs').click()
    panel = page.get_by_role("complementary")
    await expect(panel.get_by_role("heading", name="Logs of sum")).to_be_visible()
    await expect(page.locator("#logs-text")).to_contain_text("sum of 5 numbers x5 = 75")
    await shot("3-step-logs")
    await page.get_by_role("button", name="Close").click()
    await expect(panel).to_be_hidden()

    # the pool's download link answers the unit's exact bytes
    async with page.expect_download() as download:
        await page.locator("#pool-table").get_by_role("link", name="numbers.json").click()
    assert Path(await (await download.value).path()).read_bytes() == NUMBERS.read_bytes()

    # the runs list: filter by status, and a run created elsewhere appears without a reload
    await page.get_by_role("link", name="Runs", exact=True).click()
    mine = page.locator(f'#runs tr[data-run-id="{run_id}"]')
    await expect(mine.locator(".counts")).to_contain_text("3 succeeded")
    await page.get_by_label("Status").select_option("running")
    await expect(page.locator("#no-runs")).to_be_visible()
    await page.get_by_label("Status").select_option("complete")
    await expect(mine).to_be_visible()
    await page.get_by_label("Status").select_option("")
    other = await api.create_run()
    await expect(page.locator(f'#runs tr[data-run-id="{other}"] .badge')).to_have_text("created")
    await shot("4-runs")
    assert await page.evaluate("window.__sameDocument") is True, "the page reloaded"


async def test_a_failed_step_shows_its_failure(api: Api, page: Page, shot: Shot) -> None:
    run_id = await api.create_run()
    status, _ = await api.upload(run_id, "fail-input", b"anything", filename="input.txt")
    assert status == 201
    status, body = await api.call("POST", f"/api/run/{run_id}/run", json={})
    assert status == 200, body
    await api.wait_status(run_id, "complete")

    await page.goto(ui(api, f"#/run/{run_id}"))
    row = page.locator('#steps-table tr[data-operator="fail"]')
    await expect(row).to_have_attribute("data-status", "failure")
    await expect(row.locator("td.error")).to_have_text("exit code 3")
    await expect(page.locator('#lineage [data-node-type="step"]')).to_have_attribute("data-status", "failure")
    await expect(page.locator("#run-summary")).to_contain_text("1 failed")
    await shot("failed-step")
    await page.locator('#lineage [data-node-type="step"]').click()  # a step of the graph opens its logs too
    await expect(page.locator("#logs-panel .error")).to_contain_text("exit code 3")
    await expect(page.locator("#logs-text")).to_contain_text("fail: refusing to process")
    await shot("failed-step-logs")


async def test_the_examples_run_registry_and_machines(api: Api, page: Page, shot: Shot,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # the README example (what `make run` ends with) says where the web view and its run are
    assert await run_example(api.service.api_url, None, timeout=60) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[example] web view: "))
    link = re.search(r"\(this run: (\S+)\)", line)
    assert link and line.startswith(f"[example] web view: {api.service.api_url}/ui/ "), line
    await page.goto(link[1])
    await expect(page.locator('#lineage [data-node-type="step"][data-status="success"]')).to_have_count(3)

    await page.get_by_role("link", name="Registry").click()
    kinds = page.locator("#kinds-table")
    await expect(kinds.locator('tr[data-kind="number-array-json"] td.consumers')).to_have_text("length, sum")
    await expect(kinds.locator('tr[data-kind="number-array-sum-json"] td.producers')).to_have_text("sum")
    average = page.locator('#operators-table tr[data-operator="average"]')
    await expect(average.locator("td.inputs")).to_contain_text("INPUT_SUM ← number-array-sum-json")
    await expect(average.locator("td.outputs")).to_have_text("number-array-average-json")
    await shot("registry")

    await page.get_by_role("link", name="Machines").click()
    local = page.locator('#machines-table tr[data-machine="local"] td.health')
    await expect(local).to_have_attribute("data-ok", "true")
    await expect(local).to_contain_text("healthy")
    row = page.locator('#machines-table tr[data-machine="local"]')
    await expect(row.locator("td.owner")).to_have_text("serve")  # the built-in machine, shared with everyone
    await expect(row.locator("td.shared")).to_have_text("everyone")
    await shot("machines")


async def test_a_token_protected_service_asks_for_the_token(
        make_service: Callable[..., Awaitable[Api]], tmp_path: Path, page: Page, shot: Shot) -> None:
    token_file = tmp_path / "api-token"
    token_file.write_text("the-right-token-0123456789abcdef\n")
    api = await make_service(api_token_file=token_file, **FAST)
    status, _ = await api.call("GET", "/api/runs")
    assert status == 401

    await page.goto(ui(api))  # the shell itself needs no token
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await page.get_by_label("API token").fill("a-wrong-token")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#login-error")).to_contain_text("refused")
    await shot("login-refused")

    await page.get_by_label("API token").fill("the-right-token-0123456789abcdef")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    await page.get_by_role("button", name="Create run").click()
    await expect(page).to_have_url(RUN_PAGE)
    await page.get_by_label("Data kind").select_option("number-array-json")
    await page.get_by_label("File").set_input_files(NUMBERS)
    await page.get_by_role("button", name="Upload").click()
    # the live graph (SSE over fetch, with the token) and a download (a fetch with the token)
    await expect(page.locator("#lineage [data-node-id]")).to_have_count(1)
    async with page.expect_download() as download:
        await page.locator("#pool-table").get_by_role("link", name="numbers.json").click()
    assert Path(await (await download.value).path()).read_bytes() == NUMBERS.read_bytes()
    await page.get_by_role("button", name="Start").click()
    await expect(page.locator('#lineage [data-node-type="step"][data-status="success"]')).to_have_count(
        3, timeout=RUN_TIMEOUT_MS)

    await page.reload()  # the token is kept for the tab
    await expect(page.locator("#lineage [data-node-id]")).to_have_count(7)
    await shot("signed-in-run")
    await page.get_by_role("button", name="Terminate").click()
    await expect(page.locator("#run-summary .badge")).to_have_text("terminated")
    await expect(page.get_by_role("button", name="Terminate")).to_be_disabled()
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


async def test_the_shell_is_only_its_own_files(api: Api) -> None:
    """Only the files of api/ui are served, with their types and the page's CSP; anything else
    under /ui is a 404, however the path is spelled."""
    async with api.http.get("/ui", allow_redirects=False) as r:
        assert r.status == 308 and r.headers["Location"] == "/ui/"
    for path, media_type in (("/ui/", "text/html"), ("/ui/app.js", "text/javascript"),
                             ("/ui/style.css", "text/css"), ("/ui/vendor/dagre.esm.js", "text/javascript")):
        async with api.http.get(path) as r:
            assert r.status == 200 and r.content_type == media_type, path
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
            assert r.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/ui/nothing.js", "/ui/..%2Fui.py", "/ui/vendor/..%2F..%2Fui.py", "/ui/vendor/LICENSE.dagre",
                 "/ui/%2e%2e/routes.py"):
        status, body = await api.call("GET", path)
        assert status == 404 and body["error"], path


def test_the_shell_ships_in_the_package() -> None:
    """Every file of api/ui is package data, so an installed (non-editable) service serves it."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["api"]
    root = REPO / "api"
    files = {p for p in (root / "ui").rglob("*") if p.is_file()}
    assert files
    # setuptools globs each pattern relative to the package and keeps the files it matches
    shipped = {p for pattern in patterns for p in root.glob(pattern) if p.is_file()}
    missing = sorted(p.relative_to(root).as_posix() for p in files - shipped)
    assert not missing, f"not in [tool.setuptools.package-data] api: {missing}"

