"""The Kubernetes backend: runs one step attempt as a Job (see :mod:`.manifests`) and follows it
with the watch API until it ends.

* **Start or re-attach.** If the attempt's Job exists (found by GET, or ``409 AlreadyExists`` on
  create) it is watched, never created twice; the Job name is the attempt's ``external_id``.
* **Follow.** Two watches (the Job by name, its Pods by the ``mlynar.dev/job`` label), resumed
  from their resourceVersion, re-listed on 410 Gone; no polling.
* **Success** (Job condition ``Complete``): the operator container's log (plus the wrapper
  containers' output) is read into a local file, the outputs are the attempt's
  ``StepOutputReturned`` events (the upload container returned them through the API, the bytes
  are in the blob store). Job (propagation Background), PVC and Secret are deleted by
  ``release``, which the worker calls only after the outcome is appended: a redelivered step
  finds the completed Job and collects it again instead of creating it anew.
* **Failure**: a reason a user can act on — an image that cannot be pulled (named), OOMKilled,
  the timeout (``activeDeadlineSeconds`` → DeadlineExceeded), which container exited with which
  code and the last lines it printed — plus the logs; ``release`` deletes the objects unless
  ``--kube-keep-failed-jobs``.
* **Cancel** (``attempt.cancelled``): the Job and its Pods are deleted, with the PVC and Secret.
* **API trouble**: any failed call ends the attempt with ``AttemptResult(ok=False)`` whose error
  names the call and the HTTP status (``kubernetes API create job ...: 403 Forbidden: ...``),
  ``lost`` when the API did not answer or failed (5xx, 429: not the operator's failure); nothing
  is raised to the worker. An executor shutting down (task cancelled) leaves the Job running for
  the next executor to re-attach.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlynar_events import credentials
from mlynar_events.blobs import BlobStore
from mlynar_events.config import KubeSettings
from mlynar_events.events import StepScheduled
from mlynar_events.runstate import returned_outputs
from mlynar_events.secrets import SecretStore
from mlynar_events.store import EventStore

from ..backend import Attempt, AttemptResult, Output
from . import manifests as m
from .kube import Kube, KubeError, new_api_client

log = logging.getLogger("mlynar.executor.kubernetes")

PULL_ERRORS = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}
ROLE = {
    "download": "input download (wrapper container 'download')",
    "operator": "operator container",
    "upload": "output upload (wrapper container 'upload')",
}
TAIL_LINES = 4


@dataclass
class Outcome:
    state: str  # "succeeded" | "failed" | "cancelled"
    error: str | None = None
    container: str | None = None  # the container whose failure decided it
    retryable: bool = True


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def _latest_pod(pods: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    if not pods:
        return None
    return max(pods.values(), key=lambda p: (_meta(p).get("creationTimestamp") or "", _meta(p).get("name", "")))


def _limit(pod: dict[str, Any], container: str, resource: str) -> str | None:
    for c in (pod.get("spec") or {}).get("initContainers", []) + (pod.get("spec") or {}).get("containers", []):
        if m.container_role(c.get("name", "")) == container:
            return ((c.get("resources") or {}).get("limits") or {}).get(resource)
    return None


def pod_problem(pod: dict[str, Any]) -> tuple[str, str | None, bool] | None:
    """(reason, container, retryable) when the pod has failed or cannot start; else None."""
    status = pod.get("status") or {}
    for st in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        name = m.container_role(st.get("name", "?"))  # <job>-operator -> operator
        state = st.get("state") or {}
        waiting, term = state.get("waiting"), state.get("terminated")
        if waiting and waiting.get("reason") in PULL_ERRORS:
            reason = waiting["reason"]
            detail = f": {waiting['message']}" if waiting.get("message") else ""
            return (f"the image {st.get('image')!r} of the {ROLE.get(name, name)} could not be pulled "
                    f"({reason}{detail})", name, reason not in {"InvalidImageName", "ErrImageNeverPull"})
        if term and term.get("exitCode", 0) != 0:
            code, reason = term.get("exitCode"), term.get("reason")
            if reason == "OOMKilled":
                limit = _limit(pod, name, "memory")
                text = (f"the {ROLE.get(name, name)} was killed because it ran out of memory (OOMKilled, "
                        f"exit code {code}; memory limit {limit or 'not set'})")
            else:
                text = f"the {ROLE.get(name, name)} exited with code {code}"
                if reason and reason not in {"Error", "Completed"}:
                    text += f" ({reason})"
            if term.get("message"):
                text += f": {term['message'].strip()}"
            return text, name, True
    if status.get("phase") == "Failed":
        why = ": ".join(x for x in (status.get("reason"), status.get("message")) if x) or "no reason given"
        return f"the step's pod failed ({why})", None, True
    return None


POD_SETTLE = 3.0  # how long a failed Job waits for its Pod's status to say why (separate watches)


def evaluate(job: dict[str, Any], pods: dict[str, dict[str, Any]], step: StepScheduled,
             force: bool = False) -> Outcome | None:
    """Decide from the Job and its Pods whether the attempt has ended, and how. A Job that failed
    while its Pod (watched on another stream) does not show why yet is undecided unless ``force``."""
    conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []
                  if c.get("status") == "True"}
    pod = _latest_pod(pods)
    if "Complete" in conditions:
        return Outcome("succeeded")
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed is not None:
        if failed.get("reason") == "DeadlineExceeded":
            return Outcome("failed", f"the step ran longer than its timeoutSeconds ({step.spec.timeoutSeconds}s) "
                                     "and was stopped (Job DeadlineExceeded)")
        problem = pod_problem(pod) if pod else None
        if problem:
            return Outcome("failed", problem[0], problem[1], problem[2])
        if pod is not None and not force and (pod.get("status") or {}).get("phase") not in {"Failed", "Succeeded"}:
            return None
        why = ": ".join(x for x in (failed.get("reason"), failed.get("message")) if x)
        return Outcome("failed", f"the Job failed ({why or 'no reason given'})")
    if pod is not None:
        problem = pod_problem(pod)
        if problem:
            return Outcome("failed", problem[0], problem[1], problem[2])
    return None


class KubernetesBackend:
    def __init__(self, kube: Kube, settings: KubeSettings, secrets: SecretStore, store: EventStore,
                 blobs: BlobStore) -> None:
        self.kube = kube
        self.settings = settings
        self.secrets = secrets
        self.store = store
        self.blobs = blobs
        self.namespace = settings.namespace

    @classmethod
    async def create(cls, settings: KubeSettings, secrets: SecretStore, store: EventStore,
                     blobs: BlobStore) -> "KubernetesBackend":
        api = await new_api_client(settings)
        return cls(Kube(api, settings.namespace), settings, secrets, store, blobs)

    def target(self, step: StepScheduled) -> str:
        return f"kubernetes:{self.namespace}"

    def external_id(self, step: StepScheduled, attempt: int) -> str:
        return m.job_name(step.step_id, attempt)

    async def close(self) -> None:
        await self.kube.close()

    # ---- one attempt --------------------------------------------------------------------------

    async def run(self, attempt: Attempt) -> AttemptResult:
        names = m.StepObjects(attempt.external_id)
        logs = attempt.workdir / "logs.txt"
        try:
            return await self._run(attempt, names, logs)
        except KubeError as exc:
            log.warning("kubernetes attempt failed", extra={"step_id": attempt.step.step_id, "error": str(exc)})
            return AttemptResult(ok=False, error=str(exc), logs=logs if logs.exists() else None, lost=exc.transient)

    async def release(self, attempt: Attempt, *, failed: bool) -> None:
        """Delete the attempt's Job, PVC and Secret (kept when it failed and
        ``--kube-keep-failed-jobs``); called after its outcome is appended."""
        if failed and self.settings.keep_failed_jobs:
            return
        await self._cleanup(m.StepObjects(attempt.external_id), {})

    async def _run(self, a: Attempt, names: m.StepObjects, logs: Path) -> AttemptResult:
        step, ns, k = a.step, self.namespace, self.kube
        ctx = {"run_id": step.run_id, "step_id": step.step_id, "attempt": a.attempt, "job": names.job}
        job = await k.get(f"get job {names.job}", k.batch.read_namespaced_job, names.job, ns)
        if job is not None and (_meta(job).get("labels") or {}).get(m.STEP_LABEL) != step.step_id:
            return AttemptResult(ok=False, retryable=False,
                                 error=f"a Job named {names.job} exists in namespace {ns} that mlynar did not create for this step")
        if job is None and not a.cancelled.is_set():
            await a.check_open()  # not released after its outcome by another executor meanwhile
            await self._stop_previous(a)
            created = await self._create(a, names)
            log.info("step job created" if created else "step job exists; re-attaching", extra=ctx)
        else:
            log.info("re-attaching to step job", extra=ctx)
        outcome, pods = await self._follow(a, names)
        pod = _latest_pod(pods)
        await self._collect_logs(pod, logs, outcome)
        if outcome.state == "cancelled":
            await self._cleanup(names, pods)
            log.info("step job cancelled", extra=ctx)
            return AttemptResult(ok=False, cancelled=True, error="cancelled", logs=logs)
        if outcome.state == "succeeded":
            return await self._outputs(a, logs)  # the objects stay until release()
        log.info("step job failed", extra={**ctx, "error": outcome.error})
        return AttemptResult(ok=False, error=outcome.error, logs=logs, retryable=outcome.retryable)

    async def _stop_previous(self, a: Attempt) -> None:
        """A previous attempt lost to the API (no answer while it was watched) may still run: its
        Job is removed before this one is created, so a step never has two Jobs running at once.
        A previous Job that finished (failed) is left to its release."""
        if a.attempt <= 1:
            return
        previous = m.StepObjects(self.external_id(a.step, a.attempt - 1))
        k = self.kube
        job = await k.get(f"get job {previous.job}", k.batch.read_namespaced_job, previous.job, self.namespace)
        if job is not None and evaluate(job, {}, a.step, force=True) is None:
            log.info("stopping the previous attempt's job before starting this one",
                     extra={"run_id": a.step.run_id, "step_id": a.step.step_id, "job": previous.job})
            await self._cleanup(previous, {})

    async def _create(self, a: Attempt, names: m.StepObjects) -> bool:
        """Secret, PVC, Job — in that order, so the pod finds its volume and credential. Each
        create tolerates 409 (a previous executor got that far). False: the Job already existed."""
        step, ns, k, s = a.step, self.namespace, self.kube, self.settings
        key = await self.secrets.get_or_create(credentials.KEY_NAME)
        credential = credentials.step_credential(key, step.run_id, step.step_id, a.attempt)
        await k.create(f"create secret {names.secret}", k.core.create_namespaced_secret, ns,
                       m.secret(step, a.attempt, names, ns, credential))
        await k.create(f"create persistentvolumeclaim {names.pvc}", k.core.create_namespaced_persistent_volume_claim,
                       ns, m.pvc(step, a.attempt, names, ns, s.pvc_size, s.storage_class))
        job = m.job(step, a.attempt, names, ns, wrapper_image=s.wrapper_image, api_url=s.api_url)
        return await k.create(f"create job {names.job}", k.batch.create_namespaced_job, ns, job) is not None

    async def _follow(self, a: Attempt, names: m.StepObjects) -> tuple[Outcome, dict[str, dict[str, Any]]]:
        """Watch the Job and its Pods until the attempt ends or is cancelled."""
        k, ns = self.kube, self.namespace
        job: dict[str, Any] = {}
        pods: dict[str, dict[str, Any]] = {}
        gone = False
        changed = asyncio.Event()

        async def watch_job() -> None:
            nonlocal job, gone
            async for kind, obj in k.list_and_watch(f"job {names.job}", k.batch.list_namespaced_job, ns,
                                                    field_selector=f"metadata.name={names.job}"):
                if kind == "SYNC":
                    gone = not obj
                    job = obj[0] if obj else {}
                elif kind == "DELETED":
                    gone, job = True, {}
                else:
                    job = obj
                changed.set()

        async def watch_pods() -> None:
            async for kind, obj in k.list_and_watch(f"pods of job {names.job}", k.core.list_namespaced_pod, ns,
                                                    label_selector=f"{m.JOB_LABEL}={names.job}"):
                if kind == "SYNC":
                    pods.clear()
                    pods.update({_meta(p)["name"]: p for p in obj})
                elif kind == "DELETED":
                    pods.pop(_meta(obj)["name"], None)
                else:
                    pods[_meta(obj)["name"]] = obj
                changed.set()

        watchers = [asyncio.create_task(watch_job()), asyncio.create_task(watch_pods())]
        cancelled = asyncio.create_task(a.cancelled.wait())
        try:
            while True:
                wake = asyncio.create_task(changed.wait())
                done, _ = await asyncio.wait({wake, cancelled, *watchers}, return_when=asyncio.FIRST_COMPLETED,
                                             timeout=POD_SETTLE if job else None)
                wake.cancel()
                if not done and job:  # nothing new for a while: decide with what the Job says
                    outcome = evaluate(job, pods, a.step, force=True)
                    if outcome is not None:
                        return outcome, dict(pods)
                    continue
                if cancelled in done:
                    return Outcome("cancelled"), dict(pods)
                for w in watchers:
                    if w in done:
                        w.result()  # raises the watch's KubeError
                        raise KubeError(f"watch job {names.job}", None, "watch ended unexpectedly")
                changed.clear()
                if gone:
                    return Outcome("failed", f"the Job {names.job} was deleted by someone else while the step ran"), dict(pods)
                if job:
                    outcome = evaluate(job, pods, a.step)
                    if outcome is not None:
                        return outcome, dict(pods)
        finally:
            for t in (*watchers, cancelled):
                t.cancel()
            await asyncio.gather(*watchers, cancelled, return_exceptions=True)

    async def _collect_logs(self, pod: dict[str, Any] | None, dest: Path, outcome: Outcome) -> None:
        """The operator's log, then the wrappers' lines, into ``dest``; the failing container's
        last lines are added to the outcome's error."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if pod is None:
            dest.write_text("(no pod of this step's Job was found: no logs)\n")
            return
        name, k = _meta(pod)["name"], self.kube
        operator = dest.with_name("operator.log")
        try:
            await k.stream_to_file(f"read log of pod {name} container operator", k.core.read_namespaced_pod_log,
                                   operator, name, self.namespace, container=m.pod_container(pod, "operator"))
        except KubeError as exc:
            operator.write_text(f"(operator logs unavailable: {exc})\n")
        parts = [operator.read_bytes()]
        tails: dict[str, str] = {}
        for container in ("download", "upload"):
            try:
                text = await self._small_log(name, m.pod_container(pod, container), dest.with_name(f"{container}.log"))
            except KubeError:
                continue
            if text.strip():
                parts.append(f"\n--- mlynar wrapper ({container}) ---\n".encode() + text.encode())
                tails[container] = text
        tails["operator"] = parts[0].decode(errors="replace")
        dest.write_bytes(b"".join(parts))
        if outcome.state == "failed" and outcome.container in tails:
            lines = [line.strip() for line in tails[outcome.container].splitlines() if line.strip()]
            if lines and not lines[-1].startswith("(operator logs unavailable"):
                tail = " | ".join(lines[-TAIL_LINES:])
                outcome.error = f"{outcome.error}; last output: {tail[-600:]}"

    async def _small_log(self, pod: str, container: str, path: Path) -> str:
        try:
            await self.kube.stream_to_file(f"read log of pod {pod} container {container}",
                                           self.kube.core.read_namespaced_pod_log, path, pod, self.namespace,
                                           container=container, limit_bytes=256 * 1024)
            return path.read_text(errors="replace")
        finally:
            path.unlink(missing_ok=True)

    async def _outputs(self, a: Attempt, logs: Path) -> AttemptResult:
        step = a.step
        events, _ = await self.store.load_run(step.run_id)
        returned = returned_outputs(events, step.step_id, a.attempt)
        outputs = []
        for index in sorted(returned):
            e = returned[index]
            path = self.blobs.local_path(e.blob)
            if path is None:
                return AttemptResult(ok=False, logs=logs,
                                     error=f"output {index} ({e.data_kind}) was returned but its bytes are gone from the blob store")
            outputs.append(Output(e.data_kind, path, e.filename))
        return AttemptResult(ok=True, outputs=outputs, logs=logs)

    async def _cleanup(self, names: m.StepObjects, pods: dict[str, dict[str, Any]]) -> None:
        """Delete the Job (its Pods with it), then the PVC and the Secret; already gone is fine,
        other failures are logged (a leftover object is harmless, the step result stands)."""
        k, ns = self.kube, self.namespace
        calls = [(f"delete job {names.job}", k.batch.delete_namespaced_job, names.job, {"propagation_policy": "Background"})]
        calls += [(f"delete pod {p}", k.core.delete_namespaced_pod, p, {}) for p in pods]
        calls += [(f"delete persistentvolumeclaim {names.pvc}", k.core.delete_namespaced_persistent_volume_claim, names.pvc, {}),
                  (f"delete secret {names.secret}", k.core.delete_namespaced_secret, names.secret, {})]
        for what, fn, name, kw in calls:
            try:
                await k.delete(what, fn, name, ns, **kw)
            except KubeError as exc:
                log.warning("could not clean up", extra={"error": str(exc)})
