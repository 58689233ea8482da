"""Names of kinds, operators, machines and runs are DNS-1123 labels: the rule Kubernetes applies
to object names. That makes them safe as NATS subject tokens, file names and Job name parts."""

from __future__ import annotations

import re

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_LABEL = 63
NAME_JSON_SCHEMA = {"type": "string", "pattern": DNS1123_LABEL.pattern, "maxLength": MAX_LABEL}
"""The rule as a JSON schema (the OpenAPI document's names)."""


def is_dns1123_label(name: str) -> bool:
    # fullmatch: ``$`` alone would let one trailing newline through
    return isinstance(name, str) and len(name) <= MAX_LABEL and bool(DNS1123_LABEL.fullmatch(name))


def check_dns1123_label(name: str) -> str:
    """Pydantic validator body: raise ValueError with the rule spelled out."""
    if not is_dns1123_label(name):
        raise ValueError(
            f"{name!r} is not a DNS-1123 label (lower-case letters, digits and '-', "
            f"starting and ending with a letter or digit, at most {MAX_LABEL} characters)"
        )
    return name


# Kubernetes object names of a step attempt (``jobName`` / ``pvcName`` in the API, as in Mlynar).
JOB_PREFIX = "mlynar-job-"
PVC_SUFFIX = "-pvc"
SECRET_SUFFIX = "-cred"


def job_name(step_id: str, attempt: int = 1) -> str:
    """``mlynar-job-<stepId>`` for attempt 1, ``mlynar-job-<stepId>-<attempt>`` after that."""
    return f"{JOB_PREFIX}{step_id}" + (f"-{attempt}" if attempt >= 2 else "")


def pvc_name(job: str) -> str:
    return f"{job}{PVC_SUFFIX}"


def secret_name(job: str) -> str:
    return f"{job}{SECRET_SUFFIX}"
