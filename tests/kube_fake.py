"""A stateful stand-in for the Kubernetes API server, its Job controller, garbage collector and a
"kubelet", at the HTTP level, for tests of the Kubernetes executor and crd-sync. Our code talks to
it through kubernetes_asyncio configured by an ordinary kubeconfig file; nothing of ours is mocked.

What it reproduces (as documented on kubernetes.io, "API Concepts", "Jobs", "Pod Lifecycle",
"Garbage Collection", "Init Containers"):

* REST paths of core/v1 (pods, persistentvolumeclaims, secrets, pods/log), batch/v1 jobs and the
  namespaced custom resources ``datakinds``/``operators`` of ``mlynar.dev/v1alpha1``, each also
  listed and watched across all namespaces (``/apis/<group>/<version>/<plural>``, GET only);
  bearer-token authentication (401 without the kubeconfig's token).
* ``metadata.resourceVersion`` from one global counter (like etcd's revision), ``uid``,
  ``creationTimestamp``; create answers 201, and ``409 AlreadyExists`` as a ``Status`` object for
  an existing name; get/delete of a missing object answer ``404 NotFound``; Secret ``stringData``
  is merged into base64 ``data``.
* list returns ``metadata.resourceVersion`` of the collection; ``?watch=true`` streams
  newline-delimited ``{"type", "object"}`` events (ADDED/MODIFIED/DELETED) after the given
  ``resourceVersion`` (without one: synthetic ADDED for the current objects first), honours
  ``labelSelector`` (``k=v``, ``k!=v``, ``k``), ``fieldSelector`` (``metadata.name``) and
  ``timeoutSeconds`` (the stream ends, the client resumes); a resourceVersion older than the
  compaction point gets the documented ``ERROR`` event with a 410 ``Expired`` Status.
  ``compact()`` and ``drop_watches()`` let a test force the 410 path.
* DELETE with ``propagationPolicy``: Background (owner gone at once, dependents by the garbage
  collector shortly after), Foreground (dependents first), Orphan; for Jobs the REST default is
  orphaning the Pods (batch/v1 compatibility), exactly the trap a client must avoid.
* Job controller: one Pod per Job (``parallelism``/``completions`` 1), Pod labels from the template
  plus ``job-name``, ``batch.kubernetes.io/job-name``, ``controller-uid`` and an owner reference;
  ``status.startTime``/``active``/``succeeded``/``failed``; conditions ``SuccessCriteriaMet`` +
  ``Complete`` on success, ``FailureTarget`` + ``Failed`` (``BackoffLimitExceeded``) on a failed
  Pod with ``backoffLimit: 0``, ``Failed``/``DeadlineExceeded`` after ``activeDeadlineSeconds``
  (active Pods are deleted, as the controller does).
* Kubelet: a Pod waits (Pending, ``PodScheduled=False``/``Unschedulable``) until its PVCs exist;
  init containers run one after another, then the main container; statuses move through
  ``waiting: PodInitializing`` → ``running`` → ``terminated`` with ``exitCode`` and ``reason``
  (``Completed``/``Error``/``OOMKilled``); a failed init container fails the Pod (restartPolicy
  Never); an image that cannot be pulled leaves the container ``waiting`` with ``ErrImagePull``
  then ``ImagePullBackOff`` and the Pod Pending forever; a ``secretKeyRef`` to a missing Secret
  is ``CreateContainerConfigError`` until it appears. pods/log serves a container's output
  (``container``, ``limitBytes``; 400 "waiting to start" before it ran, 404 once the Pod is gone).

How containers "run": the wrapper image (``wrapper_image``) runs its real ``command`` — our own
``python -m executors.kubernetes.wrapper ...`` — as a subprocess with the container's environment;
``test/python`` (any tag) runs ``args`` with this Python; ``test/oom`` ends ``OOMKilled`` (137);
``test/sleep`` runs until killed; any other image cannot be pulled. Volume mount paths in env
values and args are rewritten to the PVC's directory on the test machine.

Users and file permissions (only when the tests run as root and a Python every uid can run is
found, :attr:`FakeKube.honours_users`; else every process runs as the test's user): a container's process runs with the uid/gid the kubelet
would give it — ``securityContext.runAsUser``/``runAsGroup`` of the container, else of the pod,
else the image's ``USER`` (:attr:`FakeKube.image_users`, by image reference; root when unset, as
for an image without ``USER``) — and the supplementary groups ``fsGroup`` and
``supplementalGroups``. ``runAsNonRoot: true`` with uid 0 leaves the container
``CreateContainerConfigError`` ("container has runAsNonRoot and image will run as root"). A
process running as root keeps only the container's capabilities: the runtime's default set, minus
``capabilities.drop`` (``ALL``), plus ``capabilities.add`` (its bounding set is cut before exec,
so a dropped ``CAP_DAC_OVERRIDE`` really cannot read another uid's ``0600`` file). With ``fsGroup``
the PVC's files are given that group, group read/write and set-gid directories before the first
container starts (the kubelet's volume ownership management). Volumes live in a directory every
uid can traverse.

What it does not reproduce: scheduling, nodes, resource enforcement, container isolation (the
processes share the test machine's file system and network; ``readOnlyRootFilesystem``,
``allowPrivilegeEscalation``, seccomp and SELinux options are ignored), graceful
deletion (objects go away at once, processes get SIGKILL, no ``deletionTimestamp``), PVC binding
modes (PVCs are Bound at once), Job retries (``backoffLimit`` > 0), ``ttlSecondsAfterFinished``,
pod failure policies, field validation, PATCH/PUT over HTTP (tests change custom resources with
:meth:`FakeKube.apply`/:meth:`FakeKube.remove`, the effect ``kubectl apply``/``delete`` has),
watch bookmarks, the watch cache's own history window, and resourceVersion semantics for list
(``resourceVersion`` on list is ignored: lists are always current).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
TOKEN = "fake-kube-token"

# (group/version prefix, plural) -> kind
RESOURCES = {
    ("api/v1", "pods"): "Pod",
    ("api/v1", "persistentvolumeclaims"): "PersistentVolumeClaim",
    ("api/v1", "secrets"): "Secret",
    ("apis/batch/v1", "jobs"): "Job",
    ("apis/mlynar.dev/v1alpha1", "datakinds"): "DataKind",
    ("apis/mlynar.dev/v1alpha1", "operators"): "Operator",
}
API_VERSION = {"api/v1": "v1", "apis/batch/v1": "batch/v1", "apis/mlynar.dev/v1alpha1": "mlynar.dev/v1alpha1"}
GROUP = {"api/v1": "", "apis/batch/v1": "batch", "apis/mlynar.dev/v1alpha1": "mlynar.dev"}


GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}

TEST_IMAGES = {"test/python", "test/oom", "test/sleep"}  # by repository, any tag
# What containerd/CRI-O give a container unless its securityContext says otherwise.
DEFAULT_CAPABILITIES = {"CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
                        "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE"}
# Linux capability numbers (include/uapi/linux/capability.h) of the names a test may use.
CAPABILITY_NUMBERS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5,
                      "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "NET_BIND_SERVICE": 10, "NET_RAW": 13,
                      "SYS_CHROOT": 18, "MKNOD": 27, "AUDIT_WRITE": 29, "SETFCAP": 31}
PR_CAPBSET_DROP = 24


def repository(image: str) -> str:
    """The image reference without its tag or digest (``registry:5000/a/b:1`` → ``registry:5000/a/b``)."""
    image = image.split("@", 1)[0]
    name, sep, tag = image.rpartition(":")
    return name if sep and "/" not in tag else image


@functools.cache  # one probe per test session, not per stand-in
def _python_for_any_uid() -> tuple[str, str] | None:
    """An interpreter and PYTHONPATH with which a process of another uid can import our code and
    its dependencies: this Python when its installation is readable by everyone, else the same
    minor version from the system's default PATH with our site-packages on PYTHONPATH (a Python
    under a private home directory, e.g. pyenv in /root, is not). None when there is neither."""
    import subprocess

    site = [p for p in sys.path if p.endswith("site-packages")]
    pythonpath = os.pathsep.join([str(REPO), *site])
    name = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, shutil.which(name, path=f"/usr/local/bin:{os.defpath}")]
    for exe in dict.fromkeys(c for c in candidates if c):
        try:
            probe = subprocess.run([exe, "-c", "import pydantic, executors.kubernetes.wrapper"], capture_output=True,
                                   env={"PYTHONPATH": pythonpath, "PATH": os.defpath}, cwd="/", timeout=60,
                                   user=65534, group=65534, extra_groups=[])
        except OSError:
            continue
        if probe.returncode == 0:
            return exe, pythonpath
    return None


def _keep_only_capabilities(keep: set[int]) -> Any:
    """A ``preexec_fn`` that cuts the bounding set to ``keep``: a uid-0 process exec'ed after it
    has exactly those capabilities (its permitted set is the bounding set)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())

    def drop() -> None:
        for cap in range(last + 1):
            if cap not in keep and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap})")

    return drop


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code: int, reason: str, message: str, details: dict | None = None) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    if details:
        body["details"] = details
    return web.json_response(body, status=code)


def match_labels(selector: str | None, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k.rstrip("=")) != v:
                return False
        elif labels.get(term) is None:
            return False
    return True


def match_fields(selector: str | None, obj: dict[str, Any]) -> bool:
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        k, _, v = term.partition("=")
        meta = obj["metadata"]
        value = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace")}.get(k.rstrip("="))
        if value != v:
            return False
    return True


TEST_NAMESPACE = "mlynar"  # where the tests run their step Jobs and custom resources


class FakeKube:
    def __init__(self, root: Path, *, wrapper_image: str = "mlynar-events:test", namespace: str = "mlynar") -> None:
        self.root = root
        self.wrapper_image = wrapper_image
        self.namespace = namespace
        self.objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}  # (prefix, plural, ns, name)
        self.rv = 100
        self.events: list[tuple[int, tuple[str, str, str, str], str, dict[str, Any]]] = []
        self.compacted = 0
        self.changed = asyncio.Condition()
        self.fail_with: int | None = None  # the switch: answer every request with this status
        self.created: Counter[tuple[str, str]] = Counter()  # (plural, name) -> successful creates
        self.requests: list[tuple[str, str, str]] = []  # (method, path, query string)
        self.image_pull_delay = 0.05
        # container processes: this Python, or (switching uids) one that every uid can run
        self.python, self.pythonpath = sys.executable, str(REPO)
        found = _python_for_any_uid() if os.geteuid() == 0 else None
        if found:
            self.python, self.pythonpath = found
        self.honours_users = found is not None
        # an image's USER as (uid, gid); the wrapper image is deploy/Dockerfile's USER 10001:10001
        self.image_users: dict[str, tuple[int, int]] = {wrapper_image: (10001, 10001)}
        # PVC directories and containers' working directories: traversable by every uid (the
        # test's tmp_path is private to its user)
        self.volumes = Path(tempfile.mkdtemp(prefix="kube-fake-volumes-"))
        self.volumes.chmod(0o711)
        self._tasks: set[asyncio.Task] = set()
        self._procs: dict[str, asyncio.subprocess.Process] = {}  # pod uid/container -> process
        self._killed: dict[str, asyncio.Event] = {}  # pod uid -> set when deleted
        self._watch_generation = 0
        self.stopping = False
        self.runner: web.AppRunner | None = None
        self.url = ""

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/{prefix:api/v1|apis/batch/v1|apis/mlynar.dev/v1alpha1}/namespaces/{ns}/{plural}", self._collection)
        # all namespaces at once (list/watch only, as for every namespaced resource)
        app.router.add_route("*", "/{prefix:api/v1|apis/batch/v1|apis/mlynar.dev/v1alpha1}/{plural:pods|persistentvolumeclaims|secrets|jobs|datakinds|operators}", self._collection)
        app.router.add_route("*", "/{prefix:api/v1|apis/batch/v1|apis/mlynar.dev/v1alpha1}/namespaces/{ns}/{plural}/{name}", self._item)
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}/log", self._log)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        # the controller loops end on this too: asyncio.wait_for in Python 3.11 can swallow a
        # cancellation that arrives as its timeout fires, and a Pod that never ends (a refused
        # container nobody deletes) would keep its Job controller polling forever
        self.stopping = True
        await self.drop_watches()
        for key in list(self._killed):
            self._killed[key].set()
        for proc in list(self._procs.values()):
            _kill(proc)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.runner is not None:
            await self.runner.cleanup()
        shutil.rmtree(self.volumes, ignore_errors=True)

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": self.namespace}}],
            "current-context": "fake",
        }))
        return path

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- object store ---------------------------------------------------------------------------

    def list(self, plural: str, ns: str | None = None) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (_, p, n, _), o in sorted(self.objects.items()) if p == plural and (ns is None or n == ns)]

    def get(self, plural: str, name: str, ns: str | None = None) -> dict[str, Any] | None:
        ns = ns or self.namespace
        for (_, p, n, nm), o in self.objects.items():
            if p == plural and n == ns and nm == name:
                return o
        return None

    async def _record(self, key: tuple[str, str, str, str], kind: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        if kind == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        self.events.append((self.rv, key, kind, copy.deepcopy(obj)))
        async with self.changed:
            self.changed.notify_all()

    async def put(self, prefix: str, plural: str, obj: dict[str, Any], *, event: str | None = None) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        ns = meta.setdefault("namespace", self.namespace)
        key = (prefix, plural, ns, meta["name"])
        existing = self.objects.get(key)
        if existing is None:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now())
        else:
            meta["uid"] = existing["metadata"]["uid"]
            meta["creationTimestamp"] = existing["metadata"]["creationTimestamp"]
        await self._record(key, event or ("ADDED" if existing is None else "MODIFIED"), obj)
        return obj

    async def apply(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        """What ``kubectl apply`` of a custom resource does: create or replace."""
        prefix = next(p for (p, pl) in RESOURCES if pl == plural)
        obj = copy.deepcopy(obj)
        if plural in {"datakinds", "operators"}:
            obj.setdefault("apiVersion", "mlynar.dev/v1alpha1")
        return await self.put(prefix, plural, obj)

    async def remove(self, plural: str, name: str, propagation: str = "Background", *, namespace: str | None = None) -> bool:
        """What ``kubectl delete`` does (in ``namespace``, default the stand-in's own)."""
        prefix = next(p for (p, pl) in RESOURCES if pl == plural)
        return await self._delete((prefix, plural, namespace or self.namespace, name), propagation)

    async def _delete(self, key: tuple[str, str, str, str], propagation: str) -> bool:
        obj = self.objects.get(key)
        if obj is None:
            return False
        uid = obj["metadata"]["uid"]
        dependents = [k for k, o in self.objects.items()
                      if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences", []))]
        if propagation == "Foreground":
            for dep in dependents:
                await self._delete(dep, "Foreground")
        elif propagation == "Orphan":
            for dep in dependents:
                o = self.objects[dep]
                o["metadata"]["ownerReferences"] = [r for r in o["metadata"]["ownerReferences"] if r.get("uid") != uid]
                await self._record(dep, "MODIFIED", o)
        await self._record(key, "DELETED", obj)
        self._on_deleted(key, obj)
        if propagation == "Background" and dependents:
            async def collect() -> None:
                await asyncio.sleep(0)  # the garbage collector works after the owner is gone (next loop turn)
                for dep in dependents:
                    await self._delete(dep, "Background")

            self._spawn(collect())
        return True

    def _on_deleted(self, key: tuple[str, str, str, str], obj: dict[str, Any]) -> None:
        if key[1] == "pods":
            uid = obj["metadata"]["uid"]
            self._killed.setdefault(uid, asyncio.Event()).set()
            for name, proc in list(self._procs.items()):
                if name.startswith(uid):
                    _kill(proc)
        elif key[1] == "persistentvolumeclaims":
            shutil.rmtree(self._pv_dir(obj["metadata"]["name"]), ignore_errors=True)

    def compact(self) -> None:
        """Forget the history so far (etcd compaction): older resourceVersions get 410."""
        self.compacted = self.rv

    async def drop_watches(self) -> None:
        """End every open watch stream (as an apiserver restart would)."""
        self._watch_generation += 1
        async with self.changed:
            self.changed.notify_all()

    # ---- HTTP -----------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler):  # type: ignore[no-untyped-def]
        self.requests.append((request.method, request.path, request.query_string))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return status(401, "Unauthorized", "Unauthorized")
        if self.fail_with == 403:
            plural = request.match_info.get("plural", "resource")
            return status(403, "Forbidden", f'{plural} is forbidden: User "system:serviceaccount:{self.namespace}:mlynar" '
                                            f"cannot {request.method.lower()} resource \"{plural}\" in namespace \"{self.namespace}\"")
        if self.fail_with is not None:
            return status(self.fail_with, "InternalError", "Internal error occurred: etcdserver: request timed out")
        return await handler(request)

    def _resource(self, request: web.Request) -> tuple[str, str, str | None]:
        """(prefix, plural, namespace); namespace None: the all-namespaces path."""
        prefix, plural = request.match_info["prefix"], request.match_info["plural"]
        if (prefix, plural) not in RESOURCES:
            raise web.HTTPNotFound()
        return prefix, plural, request.match_info.get("ns")

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        prefix, plural, ns = self._resource(request)
        if ns is None and request.method != "GET":
            return status(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        if request.method == "POST":
            return await self._create(request, prefix, plural, ns)
        if request.method != "GET":
            return status(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        q = request.query
        if q.get("watch") in GO_TRUE:  # query booleans parse like Go's strconv.ParseBool
            return await self._watch(request, prefix, plural, ns)
        items = [o for (p, pl, n, _), o in sorted(self.objects.items())
                 if (p, pl) == (prefix, plural) and ns in (None, n) and match_labels(q.get("labelSelector"), o["metadata"].get("labels", {}))
                 and match_fields(q.get("fieldSelector"), o)]
        return web.json_response({"kind": RESOURCES[(prefix, plural)] + "List", "apiVersion": API_VERSION[prefix],
                                  "metadata": {"resourceVersion": str(self.rv)}, "items": items})

    async def _create(self, request: web.Request, prefix: str, plural: str, ns: str) -> web.Response:
        obj = await request.json()
        name = (obj.get("metadata") or {}).get("name")
        kind = RESOURCES[(prefix, plural)]
        if not name:
            return status(422, "Invalid", f"{kind} \"\" is invalid: metadata.name: Required value")
        if (prefix, plural, ns, name) in self.objects:
            group = GROUP[prefix]
            return status(409, "AlreadyExists", f'{plural}{"." + group if group else ""} "{name}" already exists',
                          {"name": name, "group": group, "kind": plural})
        obj["metadata"]["namespace"] = ns
        obj.setdefault("apiVersion", API_VERSION[prefix])
        obj.setdefault("kind", kind)
        if plural == "secrets":
            data = obj.setdefault("data", {})
            for k, v in (obj.pop("stringData", None) or {}).items():
                data[k] = base64.b64encode(v.encode()).decode()
        if plural == "persistentvolumeclaims":
            obj["status"] = {"phase": "Bound", "accessModes": obj["spec"].get("accessModes", []),
                             "capacity": obj["spec"].get("resources", {}).get("requests", {})}
            self._pv_dir(name).mkdir(parents=True, exist_ok=True)
        if plural == "jobs":
            obj["status"] = {}
        await self.put(prefix, plural, obj)
        self.created[(plural, name)] += 1
        if plural == "jobs":
            self._spawn(self._job_controller((prefix, plural, ns, name)))
        return web.json_response(obj, status=201)

    async def _item(self, request: web.Request) -> web.Response:
        prefix, plural, ns = self._resource(request)
        key = (prefix, plural, ns, request.match_info["name"])
        obj = self.objects.get(key)
        group = GROUP[prefix]
        missing = status(404, "NotFound", f'{plural}{"." + group if group else ""} "{key[3]}" not found',
                         {"name": key[3], "group": group, "kind": plural})
        if request.method == "GET":
            return web.json_response(obj) if obj is not None else missing
        if request.method == "DELETE":
            if obj is None:
                return missing
            policy = request.query.get("propagationPolicy")
            if policy is None and request.can_read_body:
                try:
                    policy = (await request.json() or {}).get("propagationPolicy")
                except ValueError:
                    policy = None
            if policy is None:
                policy = "Orphan" if plural == "jobs" else "Background"
            await self._delete(key, policy)
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success",
                                      "details": {"name": key[3], "group": group, "kind": plural, "uid": obj["metadata"]["uid"]}})
        return status(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    async def _watch(self, request: web.Request, prefix: str, plural: str, ns: str | None) -> web.StreamResponse:
        q = request.query
        timeout = float(q.get("timeoutSeconds", 1800))
        rv = q.get("resourceVersion")
        labels, fields = q.get("labelSelector"), q.get("fieldSelector")
        generation = self._watch_generation
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)

        def wanted(key: tuple[str, str, str, str], obj: dict[str, Any]) -> bool:
            return key[:2] == (prefix, plural) and ns in (None, key[2]) and match_labels(labels, obj["metadata"].get("labels", {})) \
                and match_fields(fields, obj)

        async def send(kind: str, obj: dict[str, Any]) -> None:
            await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        if rv in (None, "", "0"):
            last = self.rv
            for key, obj in sorted(self.objects.items()):
                if wanted(key, obj):
                    await send("ADDED", obj)
        else:
            last = int(rv)
            if last < self.compacted:
                await send("ERROR", {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                     "message": f"too old resource version: {last} ({self.compacted})",
                                     "reason": "Expired", "code": 410})
                return resp
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while generation == self._watch_generation:
                for event_rv, key, kind, obj in list(self.events):
                    if event_rv > last:
                        last = event_rv
                        if wanted(key, obj):
                            await send(kind, obj)
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                async with self.changed:
                    if self.rv == last and generation == self._watch_generation:
                        try:
                            await asyncio.wait_for(self.changed.wait(), remaining)
                        except asyncio.TimeoutError:
                            break
        except (ConnectionResetError, asyncio.CancelledError):
            return resp
        return resp

    async def _log(self, request: web.Request) -> web.StreamResponse:
        name, ns = request.match_info["name"], request.match_info["ns"]
        pod = self.objects.get(("api/v1", "pods", ns, name))
        if pod is None:
            return status(404, "NotFound", f'pods "{name}" not found')
        containers = [c["name"] for c in pod["spec"].get("containers", [])]
        container = request.query.get("container") or (containers[0] if len(containers) == 1 else None)
        if container is None:
            return status(400, "BadRequest", f"a container name must be specified for pod {name}, choose one of: {containers}")
        path = self._log_path(pod, container)
        if not path.exists():
            return status(400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: PodInitializing')
        data = path.read_bytes()
        if "limitBytes" in request.query:
            data = data[: int(request.query["limitBytes"])]
        return web.Response(body=data, content_type="text/plain")

    # ---- Job controller -------------------------------------------------------------------------

    async def _job_controller(self, key: tuple[str, str, str, str]) -> None:
        job = self.objects[key]
        uid = job["metadata"]["uid"]
        ns, name = key[2], key[3]
        template = job["spec"]["template"]
        pod_name = f"{name}-{uuid.uuid4().hex[:5]}"
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": pod_name, "namespace": ns,
                "labels": {**template.get("metadata", {}).get("labels", {}), "job-name": name,
                           "batch.kubernetes.io/job-name": name, "controller-uid": uid,
                           "batch.kubernetes.io/controller-uid": uid},
                "annotations": template.get("metadata", {}).get("annotations", {}),
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid,
                                     "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": {**copy.deepcopy(template["spec"]), "nodeName": "fake-node"},
            "status": {"phase": "Pending", "qosClass": "Burstable"},
        }
        job["status"].update({"startTime": now(), "active": 1, "ready": 0})
        await self._record(key, "MODIFIED", job)
        await self.put("api/v1", "pods", pod)
        pod_key = ("api/v1", "pods", ns, pod_name)
        kubelet = self._spawn(self._kubelet(pod_key))
        deadline = job["spec"].get("activeDeadlineSeconds")
        try:
            while not self.stopping:
                if key not in self.objects or self.objects[key]["metadata"]["uid"] != uid:
                    return  # the Job was deleted
                current = self.objects.get(pod_key)
                phase = current["status"].get("phase") if current else "Gone"
                job = self.objects[key]
                if phase in {"Succeeded", "Failed", "Gone"}:
                    ok = phase == "Succeeded"
                    job["status"].update({"active": 0, "ready": 0, "succeeded" if ok else "failed": 1})
                    if ok:
                        job["status"]["completionTime"] = now()
                        job["status"]["conditions"] = [
                            _condition("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods"),
                            _condition("Complete", "CompletionsReached", "Reached expected number of succeeded pods")]
                    else:
                        msg = "Job has reached the specified backoff limit"
                        job["status"]["conditions"] = [_condition("FailureTarget", "BackoffLimitExceeded", msg),
                                                       _condition("Failed", "BackoffLimitExceeded", msg)]
                    await self._record(key, "MODIFIED", job)
                    return
                if deadline is not None:
                    started = datetime.strptime(job["status"]["startTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
                    if (datetime.now(timezone.utc) - started).total_seconds() >= deadline:
                        if pod_key in self.objects:
                            await self._delete(pod_key, "Background")
                        msg = "Job was active longer than specified deadline"
                        job["status"].update({"active": 0, "failed": 1})
                        job["status"]["conditions"] = [_condition("FailureTarget", "DeadlineExceeded", msg),
                                                       _condition("Failed", "DeadlineExceeded", msg)]
                        await self._record(key, "MODIFIED", job)
                        return
                async with self.changed:
                    try:
                        await asyncio.wait_for(self.changed.wait(), 0.2)
                    except asyncio.TimeoutError:
                        pass
        finally:
            if not kubelet.done() and pod_key not in self.objects:
                kubelet.cancel()

    # ---- kubelet ---------------------------------------------------------------------------------

    def _pv_dir(self, pvc: str) -> Path:
        return self.volumes / "pv" / pvc

    def _apply_fs_group(self, directory: Path, gid: int) -> None:
        """The kubelet's volume ownership management for ``fsGroup``: every file gets the group
        and group read/write (directories also execute and set-gid, so new files inherit it)."""
        for path in [directory, *directory.rglob("*")]:
            st = path.lstat()
            if path.is_symlink():
                continue
            os.chown(path, -1, gid)
            mode = st.st_mode & 0o7777
            path.chmod(mode | (0o2070 if path.is_dir() else 0o060))

    def _identity(self, pod: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
        """How the runtime would start this container's process: ``user``, ``group``,
        ``extra_groups`` and the capabilities it keeps, or ``refused`` (runAsNonRoot and root).
        Empty when the tests do not run as root (nothing can be switched)."""
        psc = pod["spec"].get("securityContext") or {}
        csc = c.get("securityContext") or {}
        image_uid, image_gid = self.image_users.get(c["image"], (0, 0))
        uid = csc.get("runAsUser", psc.get("runAsUser", image_uid))
        # without runAsGroup: the image's group for the image's own user, else the root group
        gid = csc.get("runAsGroup", psc.get("runAsGroup", image_gid if uid == image_uid else 0))
        if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) and uid == 0:
            return {"refused": "container has runAsNonRoot and image will run as root "
                               f'(pod: "{pod["metadata"]["name"]}_{pod["metadata"]["namespace"]}'
                               f'({pod["metadata"]["uid"]})", container: {c["name"]})'}
        if not self.honours_users:
            return {}
        groups = [g for g in [psc.get("fsGroup"), *psc.get("supplementalGroups", [])] if g is not None]
        identity: dict[str, Any] = {"user": uid, "group": gid, "extra_groups": groups}
        if uid == 0:
            caps = set(DEFAULT_CAPABILITIES)
            wanted = csc.get("capabilities") or {}
            drop, add = set(wanted.get("drop") or []), set(wanted.get("add") or [])
            caps = (set() if "ALL" in drop else caps - drop) | add
            identity["preexec_fn"] = _keep_only_capabilities({CAPABILITY_NUMBERS[n] for n in caps})
        return identity

    def _log_path(self, pod: dict[str, Any], container: str) -> Path:
        return self.root / "logs" / pod["metadata"]["uid"] / f"{container}.log"

    async def _update_pod(self, key: tuple[str, str, str, str], change: Any) -> bool:
        pod = self.objects.get(key)
        if pod is None:
            return False
        change(pod["status"])
        await self._record(key, "MODIFIED", pod)
        return True

    async def _wait_for(self, predicate: Any, killed: asyncio.Event) -> bool:
        while not predicate():
            if killed.is_set() or self.stopping:
                return False
            async with self.changed:
                try:
                    await asyncio.wait_for(self.changed.wait(), 0.2)
                except asyncio.TimeoutError:
                    pass
        return not killed.is_set()

    async def _kubelet(self, key: tuple[str, str, str, str]) -> None:
        pod = self.objects[key]
        uid = pod["metadata"]["uid"]
        killed = self._killed.setdefault(uid, asyncio.Event())
        spec = pod["spec"]
        ns = key[2]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v]
        inits, mains = spec.get("initContainers", []), spec.get("containers", [])

        def waiting(c: dict[str, Any], reason: str, message: str | None = None) -> dict[str, Any]:
            w = {"reason": reason}
            if message:
                w["message"] = message
            return {"name": c["name"], "image": c["image"], "imageID": "", "ready": False, "restartCount": 0,
                    "started": False, "state": {"waiting": w}, "lastState": {}}

        def set_status(s: dict[str, Any]) -> None:
            s["initContainerStatuses"] = [waiting(c, "PodInitializing") for c in inits]
            s["containerStatuses"] = [waiting(c, "PodInitializing") for c in mains]

        if not all(("api/v1", "persistentvolumeclaims", ns, c) in self.objects for c in claims):
            await self._update_pod(key, lambda s: s.update(conditions=[{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/1 nodes are available: persistentvolumeclaim not found."}]))
            if not await self._wait_for(lambda: all(("api/v1", "persistentvolumeclaims", ns, c) in self.objects for c in claims), killed):
                return
        await self._update_pod(key, lambda s: (s.update(conditions=[{"type": "PodScheduled", "status": "True"}],
                                                         startTime=now(), hostIP="10.0.0.1", podIP="10.1.0.7"), set_status(s)))
        mounts_root = {c: self._pv_dir(c) for c in claims}
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        if self.honours_users and fs_group is not None:
            for directory in mounts_root.values():
                self._apply_fs_group(directory, fs_group)
        for index, c in enumerate(inits + mains):
            is_init = index < len(inits)
            field, pos = ("initContainerStatuses", index) if is_init else ("containerStatuses", index - len(inits))
            if not is_init:
                await self._update_pod(key, lambda s: s.update(phase="Running"))
            code, reason = await self._run_container(key, pod, c, field, pos, mounts_root, killed)
            if code is None:
                return  # killed or never started
            ok = code == 0

            def terminated(s: dict[str, Any], code: int = code, reason: str = reason) -> None:
                st = s[field][pos]
                started = st["state"].get("running", {}).get("startedAt", now())
                st.update(ready=False, started=False, state={"terminated": {
                    "exitCode": code, "reason": reason, "startedAt": started, "finishedAt": now(),
                    "containerID": f"fake://{uid}/{c['name']}"}})
                if not ok:
                    s["phase"] = "Failed"
                elif not is_init:
                    s["phase"] = "Succeeded"

            await self._update_pod(key, terminated)
            if not ok:
                return

    def _env(self, pod: dict[str, Any], c: dict[str, Any], rewrite: Any) -> tuple[dict[str, str] | None, str | None]:
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.root), "PYTHONPATH": self.pythonpath,
               "HOSTNAME": pod["metadata"]["name"]}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = rewrite(e["value"])
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                secret = self.objects.get(("api/v1", "secrets", pod["metadata"]["namespace"], ref["name"]))
                if secret is None or ref["key"] not in secret.get("data", {}):
                    return None, f'secret "{ref["name"]}" not found'
                env[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        return env, None

    async def _run_container(self, key: Any, pod: dict[str, Any], c: dict[str, Any], field: str, pos: int,
                             mounts_root: dict[str, Path], killed: asyncio.Event) -> tuple[int | None, str]:
        uid = pod["metadata"]["uid"]
        image = c["image"]
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"].get("volumes", [])
                   if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"].rstrip("/"): mounts_root[volumes[m["name"]]] for m in c.get("volumeMounts", [])
                  if m["name"] in volumes}

        def rewrite(text: str) -> str:
            for mount, host in mounts.items():
                text = re.sub(rf"(?<![\w/.-]){re.escape(mount)}(?=/|\"|$)", str(host), text)
            return text

        def set_waiting(reason: str, message: str | None = None) -> Any:
            def change(s: dict[str, Any]) -> None:
                st = s[field][pos]
                st["state"] = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
            return change

        if image != self.wrapper_image and repository(image) not in TEST_IMAGES:
            message = (f'Failed to pull image "{image}": rpc error: code = NotFound desc = failed to pull and unpack '
                       f'image "{image}": not found')
            await self._update_pod(key, set_waiting("ErrImagePull", message))
            await asyncio.sleep(self.image_pull_delay)
            await self._update_pod(key, set_waiting("ImagePullBackOff", f'Back-off pulling image "{image}"'))
            await killed.wait()
            return None, ""
        identity = self._identity(pod, c)
        if "refused" in identity:
            await self._update_pod(key, set_waiting("CreateContainerConfigError", identity["refused"]))
            await killed.wait()
            return None, ""
        env, problem = self._env(pod, c, rewrite)
        while env is None:
            await self._update_pod(key, set_waiting("CreateContainerConfigError", problem))
            if not await self._wait_for(lambda: self._env(pod, c, rewrite)[0] is not None, killed):
                return None, ""
            env, problem = self._env(pod, c, rewrite)
        log_path = self._log_path(pod, c["name"])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.touch()

        def running(s: dict[str, Any]) -> None:
            st = s[field][pos]
            st.update(started=True, ready=field == "containerStatuses", state={"running": {"startedAt": now()}})

        if not await self._update_pod(key, running):
            return None, ""
        if repository(image) == "test/oom":
            log_path.write_text("allocating...\n")
            return 137, "OOMKilled"
        if repository(image) == "test/sleep":
            log_path.write_text("sleeping until stopped\n")
            await killed.wait()
            return None, ""
        argv = [rewrite(a) for a in (c.get("command") or []) + (c.get("args") or [])]
        if repository(image) == "test/python" and not c.get("command"):
            argv = [self.python] + argv
        elif argv and argv[0] == "python":
            argv[0] = self.python
        workdir = self.volumes / "cwd" / uid / c["name"]
        workdir.mkdir(parents=True, exist_ok=True)
        if identity:
            os.chown(workdir, identity["user"], identity["group"])
        with open(log_path, "ab") as out:
            proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=workdir, stdout=out, stderr=out,
                                                        start_new_session=True, **identity)
        self._procs[f"{uid}/{c['name']}"] = proc
        try:
            code = await proc.wait()
        finally:
            self._procs.pop(f"{uid}/{c['name']}", None)
        if killed.is_set():
            return None, ""
        return code, "Completed" if code == 0 else "Error"


def _condition(kind: str, reason: str, message: str) -> dict[str, str]:
    t = now()
    return {"type": kind, "status": "True", "reason": reason, "message": message, "lastProbeTime": t,
            "lastTransitionTime": t}


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
