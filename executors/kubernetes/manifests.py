"""The Kubernetes objects of one step attempt, as plain JSON-able dicts.

Per attempt: a Secret with the step credential, a PVC, and a Job whose pod runs

1. init container ``download`` (wrapper image): fetches the inputs from the API into the PVC;
2. init container ``operator``: the operator's ``spec.image`` with ``spec.args`` and the step
   environment of docs/ARCHITECTURE.md (constantEnv, configurableEnv, one ``<fileLocationEnv>`` per input,
   ``MLYNAR_OUTPUT_DIR``), ``spec.resources``;
3. container ``upload`` (wrapper image): returns the outputs listed in the manifest to the API.

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
MOUNT = "/mlynar"  # where the step PVC is mounted in all three containers
INPUTS_DIR = f"{MOUNT}/inputs"
OUTPUT_DIR = f"{MOUNT}/outputs"
CREDENTIAL_KEY = "credential"
WRAPPER_UID = 10001
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
            ATTEMPT_LABEL: str(attempt), JOB_LABEL: job}


def input_path(index: int, filename: str) -> str:
    return f"{INPUTS_DIR}/{index}/{filename}"


def operator_env(step: StepScheduled) -> list[dict[str, str]]:
    """The step environment order (docs/ARCHITECTURE.md): step.env (constantEnv then configurableEnv, already resolved), then one
    ``<fileLocationEnv>=<path>`` per input, then ``MLYNAR_OUTPUT_DIR``."""
    env = [{"name": k, "value": v} for k, v in step.env.items()]
    env += [{"name": inp.env, "value": input_path(i, inp.filename)} for i, inp in enumerate(step.inputs)]
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


def _wrapper_container(name: str, image: str, env: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "executors.kubernetes.wrapper", name],
        "env": env,
        "volumeMounts": [{"name": "work", "mountPath": MOUNT}],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}},
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": WRAPPER_UID, "runAsGroup": WRAPPER_UID,
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
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
    inputs = [{"index": i, "path": input_path(i, inp.filename)} for i, inp in enumerate(step.inputs)]
    download = _wrapper_container("download", wrapper_image,
                                  common + [{"name": "MLYNAR_INPUTS", "value": json.dumps(inputs)}])
    upload = _wrapper_container("upload", wrapper_image,
                                common + [{"name": "MLYNAR_OUTPUT_KINDS", "value": json.dumps(spec.possibleOutputKinds)}])
    operator: dict[str, Any] = {
        "name": "operator",
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
