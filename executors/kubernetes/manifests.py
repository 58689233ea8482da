"""The Kubernetes objects of one step attempt, as plain JSON-able dicts.

Per attempt: a Secret with the step credential, a PVC, and a Job whose pod runs

1. init container ``<job>-download`` (wrapper image): fetches the inputs from the API into the PVC;
2. init container ``<job>-operator``: the operator's ``spec.image`` with ``spec.args`` and the step
   environment of docs/ARCHITECTURE.md (constantEnv, configurableEnv, one ``<fileLocationEnv>`` per input,
   ``MLYNAR_OUTPUT_DIR``), ``spec.resources``;
3. container ``<job>-upload`` (wrapper image): returns the outputs listed in the manifest to the API.

Inside the pod everything follows the original Mlynar's layout, so an operator image written for
it (one that hard-codes ``/data/...``) runs unchanged: the PVC is mounted at ``/data``, input
``<fileLocationEnv>`` is ``/data/<unitId>``, ``MLYNAR_OUTPUT_DIR=/data/output``, pods carry
``run=<runId>`` and ``mlynar=step`` (next to our ``mlynar.dev/*`` labels) and the containers are
named ``<job>-download|operator|upload``.

**Any operator uid.** The operator container gets no ``securityContext`` from us: it runs as its
image's ``USER``, whatever that is. The download container (uid 10001) makes the inputs writable
by everyone (``0666``, so an operator may edit them in place) and ``/data/output`` a ``0777``
directory; the pod's ``fsGroup`` makes the volume root group-writable and adds that group to
every container. What an operator writes may still be private to its uid (a ``0600`` file, a
``0700`` directory), so the upload container runs as uid 0 with every capability dropped except
``DAC_OVERRIDE`` (reads what the operator wrote; in the default set of container runtimes and
allowed by the Pod Security Standard "baseline", unlike ``DAC_READ_SEARCH``), on a read-only root
filesystem, without privilege escalation. It writes nothing; the manifest validator only follows
paths that resolve inside the output directory.

Names: ``mlynar-job-<stepId>`` for attempt 1, ``mlynar-job-<stepId>-<attempt>`` after that; the
PVC and Secret are the Job's name plus ``-pvc`` / ``-cred``, so attempt 1 keeps Mlynar's
``mlynar-job-<stepId>-pvc``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mlynar_events.events import StepScheduled
from mlynar_events.names import job_name, pvc_name, secret_name  # noqa: F401  (job_name is used as m.job_name)

MANAGED_BY = ("app.kubernetes.io/managed-by", "mlynar")
RUN_LABEL = "mlynar.dev/run"
STEP_LABEL = "mlynar.dev/step"
ATTEMPT_LABEL = "mlynar.dev/attempt"
JOB_LABEL = "mlynar.dev/job"  # on the pod template: how the executor finds the Job's pods
# The original Mlynar's labels on its Jobs, pods and PVCs, which its users select by
# (``kubectl get pods -l run=<id>``, ``-l mlynar=step``).
ORIGINAL_RUN_LABEL = "run"
ORIGINAL_STEP_LABEL = ("mlynar", "step")
MOUNT = "/data"  # where the step PVC is mounted in all three containers (the original's path)
OUTPUT_DIR = f"{MOUNT}/output"
CREDENTIAL_KEY = "credential"
WRAPPER_UID = 10001
UPLOAD_CAPABILITIES = ["DAC_OVERRIDE"]  # the only one the upload keeps: read what any uid wrote
CONTAINERS = ("download", "operator", "upload")


@dataclass(frozen=True)
class StepObjects:
    job: str

    @property
    def pvc(self) -> str:
        return pvc_name(self.job)

    @property
    def secret(self) -> str:
        return secret_name(self.job)


def labels(step: StepScheduled, attempt: int, job: str) -> dict[str, str]:
    return {MANAGED_BY[0]: MANAGED_BY[1], RUN_LABEL: step.run_id, STEP_LABEL: step.step_id,
            ATTEMPT_LABEL: str(attempt), JOB_LABEL: job,
            ORIGINAL_RUN_LABEL: step.run_id, ORIGINAL_STEP_LABEL[0]: ORIGINAL_STEP_LABEL[1]}


def container_name(job: str, role: str) -> str:
    """``<job>-download|operator|upload``, the original's container names."""
    return f"{job}-{role}"


def container_role(name: str) -> str:
    """The role (``download``, ``operator``, ``upload``) of a step pod's container name, also for
    pods of Jobs created before containers were named after their Job (plain role names), so a
    re-attached attempt reads the right logs; any other name is returned as it is."""
    for role in CONTAINERS:
        if name == role or name.endswith(f"-{role}"):
            return role
    return name


def pod_container(pod: dict[str, Any], role: str) -> str:
    """The name of the container of ``role`` in this pod (as created: old or new naming)."""
    spec = pod.get("spec") or {}
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        if container_role(c.get("name", "")) == role:
            return str(c["name"])
    return container_name(str(((pod.get("metadata") or {}).get("labels") or {}).get(JOB_LABEL, "")), role)


def input_path(unit_id: str) -> str:
    """``/data/<unitId>``: the original's place for an input (one file per unit, named by its id;
    a step never has the same unit twice)."""
    if not unit_id or "/" in unit_id or unit_id in {".", ".."}:
        raise ValueError(f"unit id {unit_id!r} cannot be a file name")
    return f"{MOUNT}/{unit_id}"


def operator_env(step: StepScheduled) -> list[dict[str, str]]:
    """The step environment order (docs/ARCHITECTURE.md): step.env (constantEnv then configurableEnv, already resolved), then one
    ``<fileLocationEnv>=<path>`` per input, then ``MLYNAR_OUTPUT_DIR``."""
    env = [{"name": k, "value": v} for k, v in step.env.items()]
    env += [{"name": inp.env, "value": input_path(inp.unit_id)} for inp in step.inputs]
    env.append({"name": "MLYNAR_OUTPUT_DIR", "value": OUTPUT_DIR})
    return env


def secret(step: StepScheduled, attempt: int, names: StepObjects, namespace: str, credential: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": names.secret, "namespace": namespace, "labels": labels(step, attempt, names.job)},
        "stringData": {CREDENTIAL_KEY: credential},
    }


def pvc(step: StepScheduled, attempt: int, names: StepObjects, namespace: str, size: str,
        storage_class: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": names.pvc, "namespace": namespace, "labels": labels(step, attempt, names.job)},
        "spec": spec,
    }


def _wrapper_container(job: str, role: str, image: str, env: list[dict[str, Any]]) -> dict[str, Any]:
    if role == "upload":  # reads files of any uid and mode (see the module's docstring)
        identity: dict[str, Any] = {"runAsNonRoot": False, "runAsUser": 0, "runAsGroup": WRAPPER_UID,
                                    "capabilities": {"drop": ["ALL"], "add": list(UPLOAD_CAPABILITIES)}}
    else:
        identity = {"runAsNonRoot": True, "runAsUser": WRAPPER_UID, "runAsGroup": WRAPPER_UID,
                    "capabilities": {"drop": ["ALL"]}}
    return {
        "name": container_name(job, role),
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "executors.kubernetes.wrapper", role],
        "env": env,
        "volumeMounts": [{"name": "work", "mountPath": MOUNT}],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}},
        "securityContext": {**identity, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
    }


def job(step: StepScheduled, attempt: int, names: StepObjects, namespace: str, *, wrapper_image: str,
        api_url: str) -> dict[str, Any]:
    spec = step.spec
    lab = labels(step, attempt, names.job)
    common = [
        {"name": "MLYNAR_API_URL", "value": api_url},
        {"name": "MLYNAR_RUN_ID", "value": step.run_id},
        {"name": "MLYNAR_STEP_ID", "value": step.step_id},
        {"name": "MLYNAR_ATTEMPT", "value": str(attempt)},
        {"name": "MLYNAR_STEP_CREDENTIAL",
         "valueFrom": {"secretKeyRef": {"name": names.secret, "key": CREDENTIAL_KEY}}},
        {"name": "MLYNAR_OUTPUT_DIR", "value": OUTPUT_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    inputs = [{"index": i, "path": input_path(inp.unit_id)} for i, inp in enumerate(step.inputs)]
    download = _wrapper_container(names.job, "download", wrapper_image,
                                  common + [{"name": "MLYNAR_INPUTS", "value": json.dumps(inputs)}])
    upload = _wrapper_container(names.job, "upload", wrapper_image,
                                common + [{"name": "MLYNAR_OUTPUT_KINDS", "value": json.dumps(spec.possibleOutputKinds)}])
    operator: dict[str, Any] = {
        "name": container_name(names.job, "operator"),
        "image": spec.image,
        "args": list(spec.args),
        "env": operator_env(step),
        "volumeMounts": [{"name": "work", "mountPath": MOUNT}],
    }
    if spec.command:  # an extension: overrides the image's ENTRYPOINT like Kubernetes' `command`
        operator["command"] = list(spec.command)
    if spec.resources is not None:
        operator["resources"] = {k: {n: str(v) for n, v in vals.items()}
                                 for k, vals in spec.resources.model_dump().items() if vals}
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,  # retries are the executor's (spec.retries), each a new Job
        "template": {
            "metadata": {"labels": lab, "annotations": {"mlynar.dev/operator": step.operator}},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "securityContext": {"fsGroup": WRAPPER_UID, "seccompProfile": {"type": "RuntimeDefault"}},
                "initContainers": [download, operator],
                "containers": [upload],
                "volumes": [{"name": "work", "persistentVolumeClaim": {"claimName": names.pvc}}],
            },
        },
    }
    if spec.timeoutSeconds:
        job_spec["activeDeadlineSeconds"] = spec.timeoutSeconds
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": names.job, "namespace": namespace, "labels": lab,
                     "annotations": {"mlynar.dev/operator": step.operator, "mlynar.dev/revision": str(step.revision)}},
        "spec": job_spec,
    }
