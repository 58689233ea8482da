"""The download/upload wrapper of a Kubernetes step Job: ``python -m executors.kubernetes.wrapper
download|upload``. The standard library plus :mod:`mlynar_events.outputs` (pydantic), which the
image installs with the rest of the package (deploy/Dockerfile), so it is cheap to start and easy
to audit.

* ``download`` (init container 1) fetches every input of the step from the API
  (``GET /api/run/{run}/returns/{step}/inputs/{i}?attempt=N``) into the step's PVC, at the paths
  the operator container receives in its ``<fileLocationEnv>`` variables, and creates the output
  directory. The operator may run as any uid (its image's ``USER``), so inputs are left
  writable by everyone (``0666``: an operator may edit them in place) and the output directory
  is ``0777``; the volume is the step's own, nobody else mounts it.
* ``upload`` (the main container, after the operator's init container succeeded) reads
  ``$MLYNAR_OUTPUT_DIR/mlynar-out.json``, validates all of it first with the one manifest
  validator, :func:`mlynar_events.outputs.read_output_manifest` (every file exists, is a regular
  file inside the output directory, every kind is one of the operator's
  ``possibleOutputKinds``), then streams each output to
  ``POST /api/run/{run}/returns/{step}/{kind}?attempt=N&index=i&filename=f``.

Any problem — an HTTP error, a missing file, a bad manifest — is printed as one line naming it
and exits non-zero, which fails the Job. Connection errors and 5xx answers are retried a few
times with backoff (the API may be rolling); 4xx answers are not.

Environment: ``MLYNAR_API_URL``, ``MLYNAR_RUN_ID``, ``MLYNAR_STEP_ID``, ``MLYNAR_ATTEMPT``,
``MLYNAR_STEP_CREDENTIAL`` (from the step's Secret), ``MLYNAR_OUTPUT_DIR``; download also
``MLYNAR_INPUTS`` (JSON ``[{"index": i, "path": "..."}]``), upload ``MLYNAR_OUTPUT_KINDS`` (JSON
list).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mlynar_events.outputs import CheckedOutput, OutputManifestError, read_output_manifest

TRIES = 5
CHUNK = 1024 * 1024
TIMEOUT = 60.0


class WrapperError(Exception):
    """What went wrong, in one line a user can act on."""


@dataclass
class Context:
    api_url: str
    run_id: str
    step_id: str
    attempt: int
    credential: str

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "Context":
        missing = [k for k in ("MLYNAR_API_URL", "MLYNAR_RUN_ID", "MLYNAR_STEP_ID", "MLYNAR_ATTEMPT",
                               "MLYNAR_STEP_CREDENTIAL") if not env.get(k)]
        if missing:
            raise WrapperError(f"environment variables {missing} are not set")
        try:
            attempt = int(env["MLYNAR_ATTEMPT"])
        except ValueError:
            raise WrapperError(f"MLYNAR_ATTEMPT must be an integer, got {env['MLYNAR_ATTEMPT']!r}") from None
        return cls(env["MLYNAR_API_URL"].rstrip("/"), env["MLYNAR_RUN_ID"], env["MLYNAR_STEP_ID"], attempt,
                   env["MLYNAR_STEP_CREDENTIAL"])

    def url(self, tail: str, **query: object) -> str:
        q = urllib.parse.urlencode({"attempt": self.attempt, **query})
        return f"{self.api_url}/api/run/{self.run_id}/returns/{self.step_id}/{tail}?{q}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential}"}


def _explain(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read() or b"{}")
        detail = body.get("error") or body
    except (ValueError, AttributeError):
        detail = exc.reason
    return f"HTTP {exc.code} {exc.reason}: {detail}"


def _with_retries(what: str, call):  # type: ignore[no-untyped-def]
    for n in range(TRIES):
        try:
            return call()
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or n == TRIES - 1:
                raise WrapperError(f"{what}: {_explain(exc)}") from None
            problem = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            if n == TRIES - 1:
                raise WrapperError(f"{what}: API unreachable: {getattr(exc, 'reason', exc)}") from None
            problem = str(getattr(exc, "reason", exc))
        delay = min(0.5 * 2**n, 8.0) * (0.5 + random.random())
        print(f"{what}: {problem}; retrying in {delay:.1f}s", file=sys.stderr, flush=True)
        time.sleep(delay)


# ---- download --------------------------------------------------------------------------------


def _make_shared_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) open to every uid: the operator image's user is not
    known. A directory that exists and is not ours (the volume root, group-writable through the
    pod's ``fsGroup``) is left as it is."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for p in reversed(missing):
        os.chmod(p, 0o777)  # mkdir's mode is cut by the umask; chmod is not


def download(ctx: Context, env: dict[str, str]) -> int:
    try:
        inputs = json.loads(env.get("MLYNAR_INPUTS", "[]"))
        assert isinstance(inputs, list) and all(isinstance(i, dict) and "index" in i and "path" in i for i in inputs)
    except (ValueError, AssertionError):
        raise WrapperError("MLYNAR_INPUTS must be a JSON list of {index, path}") from None
    out_dir = env.get("MLYNAR_OUTPUT_DIR")
    if out_dir:
        _make_shared_dir(Path(out_dir))
    for item in inputs:
        dest = Path(item["path"])
        _make_shared_dir(dest.parent)

        def fetch() -> int:
            request = urllib.request.Request(ctx.url(f"inputs/{int(item['index'])}"), headers=ctx.headers())
            part = dest.with_name(dest.name + ".part")
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response, open(part, "wb") as f:
                shutil.copyfileobj(response, f, CHUNK)
            os.chmod(part, 0o666)  # an operator of any uid may edit its input in place
            part.replace(dest)
            return dest.stat().st_size

        size = _with_retries(f"downloading input {item['index']}", fetch)
        print(f"downloaded input {item['index']} to {dest} ({size} bytes)", flush=True)
    return 0


# ---- upload ----------------------------------------------------------------------------------


def read_manifest(out_dir: Path, allowed_kinds: list[str]) -> list[CheckedOutput]:
    """The manifest's outputs, checked by :func:`mlynar_events.outputs.read_output_manifest`;
    raises WrapperError naming the problems found."""
    try:
        return read_output_manifest(out_dir, allowed_kinds)
    except OutputManifestError as exc:
        raise WrapperError(str(exc)) from None


def upload(ctx: Context, env: dict[str, str]) -> int:
    out_dir = env.get("MLYNAR_OUTPUT_DIR")
    if not out_dir:
        raise WrapperError("MLYNAR_OUTPUT_DIR is not set")
    try:
        allowed = json.loads(env.get("MLYNAR_OUTPUT_KINDS", "[]"))
        assert isinstance(allowed, list)
    except (ValueError, AssertionError):
        raise WrapperError("MLYNAR_OUTPUT_KINDS must be a JSON list of data kind names") from None
    planned = read_manifest(Path(out_dir), allowed)
    for out in planned:
        size = out.path.stat().st_size

        def post() -> dict:
            with open(out.path, "rb") as body:
                request = urllib.request.Request(
                    ctx.url(urllib.parse.quote(out.data_kind, safe=""), index=out.index, filename=out.path.name),
                    data=body, method="POST",
                    headers={**ctx.headers(), "Content-Type": "application/octet-stream",
                             "Content-Length": str(size)})
                with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                    return json.loads(response.read() or b"{}")

        answer = _with_retries(f"returning output {out.index} ({out.data_kind}, {out.path.name})", post)
        print(f"returned output {out.index}: {out.data_kind} {out.path.name} ({size} bytes, sha256 "
              f"{answer.get('sha256', '?')[:12]})", flush=True)
    print(f"returned {len(planned)} output(s)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in {"download", "upload"}:
        print("usage: python -m executors.kubernetes.wrapper download|upload", file=sys.stderr)
        return 2
    env = dict(os.environ)
    try:
        ctx = Context.from_env(env)
        return download(ctx, env) if args[0] == "download" else upload(ctx, env)
    except WrapperError as exc:
        print(f"mlynar {args[0]} failed: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
