"""The Kubernetes manifests under deploy/: rendered with `kubectl kustomize`, every object checked
against the Kubernetes API schemas (kubernetes-validate), the custom resources in deploy/examples
and Mlynar's own example documents checked against our CRDs' openAPIV3Schema.

No cluster is needed, but `kubectl` is: CI installs it, and a missing kubectl is a failure, not a
skip, so a broken base can never pass unnoticed.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.32.0"
PART_OF = ("app.kubernetes.io/part-of", "mlynar-events")

EXPECTED_DEPLOYMENTS = {
    "mlynar-api": "api,projector",
    "mlynar-solver": "solver,webhooks",
    "mlynar-executor": "executor",
    "mlynar-crd-sync": "crd-sync",
}

EXPECTED_RULES = {
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
    ("", "pods"): {"get", "list", "watch", "delete"},
    ("", "pods/log"): {"get"},
    ("", "persistentvolumeclaims"): {"get", "list", "watch", "create", "delete"},
    ("", "secrets"): {"create", "get", "delete"},
    ("mlynar.dev", "datakinds"): {"get", "list", "watch"},
    ("mlynar.dev", "operators"): {"get", "list", "watch"},
    ("", "events"): {"create"},
}

# Mlynar's README examples, verbatim in content (a DataKind with only displayName; an Operator with
# image/args/inputs/possibleOutputKinds/configurableEnv/constantEnv).
MLYNAR_DATAKIND = {
    "apiVersion": "mlynar.dev/v1alpha1",
    "kind": "DataKind",
    "metadata": {"name": "number-array-json"},
    "spec": {"displayName": "Number Array JSON"},
}
MLYNAR_OPERATOR = {
    "apiVersion": "mlynar.dev/v1alpha1",
    "kind": "Operator",
    "metadata": {"name": "sum", "namespace": "default"},
    "spec": {
        "image": "ffluffyhedgehog/mlynar-example-sum:latest",
        "args": ["--verbose"],
        "possibleOutputKinds": ["number-array-sum-json"],
        "inputs": [{"fileLocationEnv": "INPUT_ARRAY", "dataKind": "number-array-json"}],
        "configurableEnv": [{"name": "MULTIPLY_BY", "defaultValue": "1"}],
        "constantEnv": [{"name": "SOME_ENV_VAR", "value": "SOME_VALUE"}],
    },
}


# --------------------------------------------------------------------------- rendering


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl is not on PATH: tests/test_deploy.py renders deploy/ with `kubectl kustomize` "
            "(kubectl >= 1.27 with built-in kustomize). Install kubectl; CI does.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"`kubectl kustomize deploy/` failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, "kubectl kustomize deploy/ rendered nothing"
    return docs


def _find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert found, f"no {kind} {name or ''} in the rendered base"
    return found


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = _find(docs, kind, name)
    assert len(found) == 1, f"{len(found)} objects {kind}/{name}"
    return found[0]


def _pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# --------------------------------------------------------------------------- CRD schema helpers


def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD's structural schema as the API server applies it with strict field validation
    (kubectl's default since 1.27): an unknown field is an error, not silently pruned. Objects
    with `properties` and no `additionalProperties` get `additionalProperties: false`, except
    where x-kubernetes-preserve-unknown-fields is set; `metadata` stays open."""
    schema = copy.deepcopy(schema)

    def walk(node: Any, name: str | None = None) -> None:
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
                and name != "metadata"
            ):
                node["additionalProperties"] = False
            for key, value in node.items():
                if key == "properties":
                    for prop, sub in value.items():
                        walk(sub, prop)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def crd_validators(rendered) -> dict[str, jsonschema.Draft7Validator]:
    validators = {}
    for crd in _find(rendered, "CustomResourceDefinition"):
        spec = crd["spec"]
        for version in spec["versions"]:
            api_version = f"{spec['group']}/{version['name']}"
            schema = _closed(version["schema"]["openAPIV3Schema"])
            jsonschema.Draft7Validator.check_schema(schema)
            validators[f"{api_version}/{spec['names']['kind']}"] = jsonschema.Draft7Validator(schema)
    return validators


def _cr_errors(validators, obj: dict[str, Any]) -> list[str]:
    key = f"{obj['apiVersion']}/{obj['kind']}"
    assert key in validators, f"no CRD serves {key}"
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in validators[key].iter_errors(obj)
    ]


# --------------------------------------------------------------------------- whole-base checks


def test_every_rendered_object_is_valid_kubernetes(rendered):
    problems = []
    for obj in rendered:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.absolute_path)
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert not problems, "\n".join(problems)


def test_rendered_base_has_every_expected_object(rendered):
    names = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    for expected in [
        ("CustomResourceDefinition", "datakinds.mlynar.dev"),
        ("CustomResourceDefinition", "operators.mlynar.dev"),
        ("ServiceAccount", "mlynar"),
        ("Role", "mlynar"),
        ("RoleBinding", "mlynar"),
        ("StatefulSet", "nats"),
        ("Service", "nats"),
        ("Service", "nats-headless"),
        ("PodDisruptionBudget", "nats"),
        ("Service", "mlynar-api"),
        ("Service", "mlynar-service"),
        ("PersistentVolumeClaim", "mlynar-blobs"),
        *[("Deployment", n) for n in EXPECTED_DEPLOYMENTS],
    ]:
        assert expected in names, f"{expected} missing from the rendered base"
    # The API token Secret is created by the user, never shipped in the base.
    assert not [d for d in rendered if d["kind"] == "Secret"]
    # Examples are not part of the kustomization.
    assert not [d for d in rendered if d["apiVersion"].startswith("mlynar.dev/")]


def test_no_namespace_is_forced_and_everything_is_labelled(rendered):
    for obj in rendered:
        meta = obj["metadata"]
        assert "namespace" not in meta, f"{obj['kind']}/{meta['name']} pins a namespace"
        assert meta.get("labels", {}).get(PART_OF[0]) == PART_OF[1], f"{obj['kind']}/{meta['name']} lacks {PART_OF}"
    for where, _ in _pod_specs(rendered):
        kind, name = where.split("/")
        template = _one(rendered, kind, name)["spec"]["template"]
        assert template["metadata"]["labels"].get(PART_OF[0]) == PART_OF[1], f"{where} pods lack {PART_OF}"


def test_workload_selectors_match_their_pods_and_services_select_something(rendered):
    pod_labels = []
    for d in rendered:
        if d["kind"] in {"Deployment", "StatefulSet"}:
            selector = d["spec"]["selector"]["matchLabels"]
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{d['metadata']['name']}: selector does not match its pods"
            pod_labels.append(labels)
    for kind in ("Service", "PodDisruptionBudget"):
        for d in _find(rendered, kind):
            selector = d["spec"]["selector"]
            selector = selector.get("matchLabels", selector) if kind == "PodDisruptionBudget" else selector
            assert any(selector.items() <= labels.items() for labels in pod_labels), (
                f"{kind}/{d['metadata']['name']} selects no pods"
            )


# --------------------------------------------------------------------------- mlynar deployments


def test_deployments_run_the_expected_roles(rendered):
    for name, roles in EXPECTED_DEPLOYMENTS.items():
        dep = _one(rendered, "Deployment", name)
        containers = dep["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1
        container = containers[0]
        env = _env(container)
        assert env.get("MLYNAR_ROLES") == roles, f"{name}: MLYNAR_ROLES={env.get('MLYNAR_ROLES')!r}"
        assert container["image"].split(":")[0].endswith("mlynar-events"), f"{name}: not the mlynar image"
        assert container["args"] == ["serve"]
        assert env["MLYNAR_NATS_URL"] == "nats://nats:4222"
        assert env["MLYNAR_DATA_DIR"] == "/data"
        assert env["MLYNAR_LOCAL_MACHINE"] == "false"
        assert env["MLYNAR_STREAM_REPLICAS"] == "3"
        assert env["MLYNAR_LOG_FORMAT"] == "json"
        assert env["MLYNAR_KUBE_IN_CLUSTER"] == "true"
        assert env["MLYNAR_KUBE_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_every_mlynar_env_var_is_a_real_serve_flag(rendered):
    """A typo in a variable name would be silently ignored by the process; catch it here."""
    from mlynar_events.config import add_serve_flags, env_name

    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    known = {env_name(opt) for action in parser._actions for opt in action.option_strings if opt.startswith("--")}
    for where, spec in _pod_specs(rendered):
        for container in spec["containers"]:
            for var in _env(container):
                if var.startswith("MLYNAR_"):
                    assert var in known, f"{where}: {var} is not a `mlynar serve` flag"


def test_api_deployment_serves_port_3000_with_health_probes_and_token(rendered):
    dep = _one(rendered, "Deployment", "mlynar-api")
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = _env(container)
    assert env["MLYNAR_HOST"] == "0.0.0.0"
    assert env["MLYNAR_API_TOKEN_FILE"] == "/etc/mlynar/api-token/token"
    assert "MLYNAR_INSECURE_NO_AUTH" not in env
    assert {"name": "http", "containerPort": 3000, "protocol": "TCP"} in container["ports"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz", probe
        assert container[probe]["httpGet"]["port"] in ("http", 3000), probe
    token_volumes = [v for v in pod["volumes"] if "secret" in v]
    assert [v["secret"]["secretName"] for v in token_volumes] == ["mlynar-api-token"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/etc/mlynar/api-token"] == token_volumes[0]["name"]
    # Each replica's own projection lives in an emptyDir.
    data = next(v for v in pod["volumes"] if v["name"] == mounts["/data"])
    assert "emptyDir" in data

    svc = _one(rendered, "Service", "mlynar-api")
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(3000, "http")]


def test_the_original_service_name_reaches_the_api(rendered):
    """In-cluster clients of the original Mlynar (and its wrapper images) call
    http://mlynar-service:3000: the same pods and port as mlynar-api."""
    ours, original = _one(rendered, "Service", "mlynar-api"), _one(rendered, "Service", "mlynar-service")
    assert original["spec"]["selector"] == ours["spec"]["selector"]
    assert [(p["port"], p["targetPort"]) for p in original["spec"]["ports"]] == [(3000, "http")]


def test_blob_store_is_a_shared_rwx_volume_of_api_and_executor(rendered):
    pvc = _one(rendered, "PersistentVolumeClaim", "mlynar-blobs")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("mlynar-api", "mlynar-executor"):
        pod = _one(rendered, "Deployment", name)["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert _env(container)["MLYNAR_BLOB_DIR"] == "/data/blobs"
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/data/blobs")
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["persistentVolumeClaim"]["claimName"] == "mlynar-blobs"


def test_kubernetes_access_only_where_needed(rendered):
    for name in ("mlynar-executor", "mlynar-crd-sync"):
        pod = _one(rendered, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "mlynar", name
    for name in ("mlynar-api", "mlynar-solver"):
        pod = _one(rendered, "Deployment", name)["spec"]["template"]["spec"]
        assert pod.get("serviceAccountName", "default") == "default", name
        assert pod["automountServiceAccountToken"] is False, name


def test_crd_sync_is_a_single_watcher(rendered):
    dep = _one(rendered, "Deployment", "mlynar-crd-sync")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    assert _env(dep["spec"]["template"]["spec"]["containers"][0])["MLYNAR_KUBE_WATCH_CRDS"] == "true"


def test_executor_wrapper_image_is_the_deployment_image(rendered):
    container = _one(rendered, "Deployment", "mlynar-executor")["spec"]["template"]["spec"]["containers"][0]
    assert _env(container)["MLYNAR_KUBE_WRAPPER_IMAGE"] == container["image"]


def test_every_container_is_limited_and_unprivileged(rendered):
    for where, spec in _pod_specs(rendered):
        pod_sc = spec.get("securityContext", {})
        for container in spec.get("initContainers", []) + spec["containers"]:
            label = f"{where} container {container['name']}"
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{label}: resources.{part} needs cpu and memory"
            sc = container.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{label}: not runAsNonRoot"
            assert sc.get("allowPrivilegeEscalation") is False, f"{label}: allowPrivilegeEscalation"
            assert sc.get("readOnlyRootFilesystem") is True, f"{label}: writable root filesystem"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{label}: capabilities not dropped"
            assert not sc.get("privileged"), label
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert pod_sc.get("runAsUser", 1) != 0, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), where


# --------------------------------------------------------------------------- step Jobs


BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
"""What the Pod Security Standard "baseline" lets a container add (kubernetes.io, Pod Security
Standards, Capabilities)."""


def test_step_jobs_are_valid_kubernetes_within_pod_security_baseline():
    """The Job the executor creates per step: valid against the API schema, and admitted where the
    namespace enforces Pod Security "baseline" (the wrappers add no capability beyond it, nothing
    privileged, no host namespaces)."""
    from executors.kubernetes import manifests
    from mlynar_events.events import StepInput, StepScheduled
    from mlynar_events.specs import parse_document

    spec = parse_document(copy.deepcopy(MLYNAR_OPERATOR)).spec
    step = StepScheduled(run_id="5b0c3f2e-8f43-4c55-9d1e-4f8c2a6d7e90", step_id="0123456789abcdef0123", operator="sum",
                         revision=1, spec=spec, env={"MULTIPLY_BY": "1"}, ancestors=[],
                         inputs=[StepInput(env="INPUT_ARRAY", unit_id="7d2c6a8e-2b4f-4f0e-9a51-3c3b8f0d1e22",
                                           data_kind="number-array-json", blob="b", filename="numbers.json")])
    names = manifests.StepObjects(manifests.job_name(step.step_id, 12))
    job = manifests.job(step, 12, names, "mlynar", wrapper_image="mlynar-events:latest", api_url="http://mlynar-api:3000")
    for obj in (job, manifests.pvc(step, 12, names, "mlynar", "1Gi", None),
                manifests.secret(step, 12, names, "mlynar", "credential")):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    for container in pod["initContainers"] + pod["containers"]:
        sc = container.get("securityContext", {})
        assert not sc.get("privileged"), container["name"]
        assert set(sc.get("capabilities", {}).get("add", [])) <= BASELINE_CAPABILITIES, container["name"]
        assert len(container["name"]) <= 63, container["name"]


# --------------------------------------------------------------------------- watching other namespaces


def test_crd_sync_all_namespaces_component(tmp_path):
    """deploy/components/crd-sync-all-namespaces, used as its comment says: crd-sync watches every
    namespace (MLYNAR_KUBE_WATCH_NAMESPACES=*) with a read-only ClusterRole for the two custom
    resources, bound to the mlynar ServiceAccount of the overlay's namespace."""
    import os

    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "namespace": "mlynar-prod",
        "resources": [os.path.relpath(DEPLOY, overlay)],
        "components": [os.path.relpath(DEPLOY / "components" / "crd-sync-all-namespaces", overlay)],
    }))
    proc = subprocess.run([_kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    for obj in docs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    role = _one(docs, "ClusterRole", "mlynar-crd-sync")
    assert role["rules"] == [{"apiGroups": ["mlynar.dev"], "resources": ["datakinds", "operators"],
                              "verbs": ["get", "list", "watch"]}]
    binding = _one(docs, "ClusterRoleBinding", "mlynar-crd-sync")
    assert binding["roleRef"]["name"] == "mlynar-crd-sync"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mlynar", "namespace": "mlynar-prod"}]
    sync = _one(docs, "Deployment", "mlynar-crd-sync")["spec"]["template"]["spec"]
    assert sync["serviceAccountName"] == "mlynar"
    env = _env(sync["containers"][0])
    assert env["MLYNAR_KUBE_WATCH_NAMESPACES"] == "*" and env["MLYNAR_ROLES"] == "crd-sync"
    assert env["MLYNAR_KUBE_WATCH_CRDS"] == "true"

    from mlynar_events.config import ServeSettings, add_serve_flags, env_name

    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    known = {env_name(opt) for action in parser._actions for opt in action.option_strings if opt.startswith("--")}
    assert "MLYNAR_KUBE_WATCH_NAMESPACES" in known
    settings = ServeSettings(kube_watch_namespaces=env["MLYNAR_KUBE_WATCH_NAMESPACES"], kube_namespace="mlynar-prod")
    assert settings.kube.crd_namespaces() is None  # all namespaces
    assert ServeSettings(kube_watch_namespaces="default, mlynar-prod,").kube.crd_namespaces() == ["default", "mlynar-prod"]
    assert ServeSettings(kube_namespace="mlynar-prod").kube.crd_namespaces() == ["mlynar-prod"]
    # the other Deployments are not touched
    assert "MLYNAR_KUBE_WATCH_NAMESPACES" not in _env(_one(docs, "Deployment", "mlynar-executor")["spec"]["template"]["spec"]["containers"][0])


# --------------------------------------------------------------------------- RBAC


def test_role_grants_exactly_the_listed_verbs(rendered):
    role = _one(rendered, "Role", "mlynar")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule or "create" not in rule["verbs"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource), f"wildcard in {rule}"
                assert "*" not in rule["verbs"], f"wildcard verb in {rule}"
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == EXPECTED_RULES
    assert not [d for d in rendered if d["kind"] in {"ClusterRole", "ClusterRoleBinding"}]

    binding = _one(rendered, "RoleBinding", "mlynar")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "mlynar"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mlynar"}]


# --------------------------------------------------------------------------- NATS


def test_nats_is_a_three_node_jetstream_cluster(rendered):
    sts = _one(rendered, "StatefulSet", "nats")
    spec = sts["spec"]
    assert spec["replicas"] == 3
    assert spec["serviceName"] == "nats-headless"
    assert spec["podManagementPolicy"] == "Parallel"
    assert [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]] == ["data"]
    container = spec["template"]["spec"]["containers"][0]
    assert container["image"] == "nats:2.11-alpine"
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/data", "/etc/nats-config"}

    headless = _one(rendered, "Service", "nats-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert 6222 in {p["port"] for p in headless["spec"]["ports"]}
    client = _one(rendered, "Service", "nats")
    assert [p["port"] for p in client["spec"]["ports"]] == [4222]

    pdb = _one(rendered, "PodDisruptionBudget", "nats")
    assert pdb["spec"]["maxUnavailable"] == 1

    # The config map is generated (hash-suffixed) and mounted by its rendered name.
    config_volume = next(v for v in spec["template"]["spec"]["volumes"] if "configMap" in v)
    cm = _one(rendered, "ConfigMap", config_volume["configMap"]["name"])
    conf = cm["data"]["nats.conf"]
    assert "store_dir: /data" in conf
    assert "server_name: $SERVER_NAME" in conf
    for i in range(3):
        assert f"nats://nats-{i}.nats-headless:6222" in conf
    assert "--config" in container["command"] and "/etc/nats-config/nats.conf" in container["command"]


# --------------------------------------------------------------------------- CRDs


def test_crds_have_the_mlynar_names(rendered):
    expected = {
        "datakinds.mlynar.dev": ("DataKind", "datakinds", "dk"),
        "operators.mlynar.dev": ("Operator", "operators", "op"),
    }
    for name, (kind, plural, short) in expected.items():
        crd = _one(rendered, "CustomResourceDefinition", name)["spec"]
        assert crd["group"] == "mlynar.dev" and crd["scope"] == "Namespaced"
        assert crd["names"]["kind"] == kind and crd["names"]["plural"] == plural
        assert short in crd["names"]["shortNames"]
        assert [(v["name"], v["served"], v["storage"]) for v in crd["versions"]] == [("v1alpha1", True, True)]
        columns = [c["name"] for c in crd["versions"][0]["additionalPrinterColumns"]]
        assert "Age" in columns
    op_columns = [c["name"] for c in _one(rendered, "CustomResourceDefinition", "operators.mlynar.dev")["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert {"Image", "Machine"} <= set(op_columns)


def test_crd_files_are_the_rendered_ones(rendered):
    for name in ("datakinds", "operators"):
        (crd,) = _load_yaml_docs(DEPLOY / "crds" / f"{name}.yaml")
        assert crd["metadata"]["name"] == f"{name}.mlynar.dev"


def test_crds_accept_mlynars_original_examples(crd_validators):
    assert _cr_errors(crd_validators, MLYNAR_DATAKIND) == []
    assert _cr_errors(crd_validators, MLYNAR_OPERATOR) == []
    minimal = copy.deepcopy(MLYNAR_OPERATOR)
    for optional in ("args", "configurableEnv", "constantEnv"):
        del minimal["spec"][optional]
    assert _cr_errors(crd_validators, minimal) == []


def test_crds_accept_the_extensions(crd_validators):
    op = copy.deepcopy(MLYNAR_OPERATOR)
    op["spec"].update(
        timeoutSeconds=600,
        retries=3,
        command=["python", "sum.py"],
        resources={"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}},
    )
    assert _cr_errors(crd_validators, op) == []
    on_machine = {
        "apiVersion": "mlynar.dev/v1alpha1",
        "kind": "Operator",
        "metadata": {"name": "sum-on-laptop"},
        "spec": {
            "machine": "laptop",
            "command": ["python3", "sum.py"],
            "inputs": [{"fileLocationEnv": "INPUT_ARRAY", "dataKind": "number-array-json"}],
            "possibleOutputKinds": ["number-array-sum-json"],
        },
    }
    assert _cr_errors(crd_validators, on_machine) == []


@pytest.mark.parametrize(
    "change, where",
    [
        (lambda s: s.update(retries="3"), "spec.retries"),
        (lambda s: s.update(retries=-1), "spec.retries"),
        (lambda s: s.update(timeoutSeconds=0), "spec.timeoutSeconds"),
        (lambda s: s.update(args="--verbose"), "spec.args"),
        (lambda s: s.update(imagee="typo:latest"), "spec"),
        (lambda s: s["inputs"][0].pop("dataKind"), "spec.inputs.0"),
        (lambda s: s["inputs"][0].update(fileLocationEnv="NOT AN ENV"), "spec.inputs.0.fileLocationEnv"),
        (lambda s: s.update(possibleOutputKinds=["Not_A_Label"]), "spec.possibleOutputKinds.0"),
        (lambda s: s.update(resources={"limits": {"memory": "lots"}}), "spec.resources.limits.memory"),
        (lambda s: s.update(resources={"limit": {"memory": "1Gi"}}), "spec.resources"),
    ],
)
def test_crds_reject_malformed_operators(crd_validators, change, where):
    op = copy.deepcopy(MLYNAR_OPERATOR)
    change(op["spec"])
    errors = _cr_errors(crd_validators, op)
    assert errors, f"accepted an operator with a bad {where}"
    assert any(e.startswith(where) for e in errors), errors


def test_crds_reject_a_datakind_with_a_non_string_display_name(crd_validators):
    dk = copy.deepcopy(MLYNAR_DATAKIND)
    dk["spec"]["displayName"] = 42
    assert _cr_errors(crd_validators, dk)


@pytest.mark.parametrize("name", ["number.array", "Numbers", "x" * 64, "-numbers"])
def test_crds_reject_names_that_are_not_dns1123_labels(crd_validators, name):
    """Names are subject tokens in the event stream; Kubernetes alone would allow dots."""
    for doc in (MLYNAR_DATAKIND, MLYNAR_OPERATOR):
        obj = copy.deepcopy(doc)
        obj["metadata"]["name"] = name
        assert any(e.startswith("metadata.name") for e in _cr_errors(crd_validators, obj)), (doc["kind"], name)


def test_examples_are_valid_custom_resources(crd_validators):
    files = sorted((DEPLOY / "examples").glob("*.yaml"))
    assert files, "deploy/examples is empty"
    seen: dict[str, set[str]] = {}
    for path in files:
        for obj in _load_yaml_docs(path):
            errors = _cr_errors(crd_validators, obj)
            assert errors == [], f"{path.name} {obj['kind']}/{obj['metadata']['name']}: {errors}"
            seen.setdefault(obj["kind"], set()).add(obj["metadata"]["name"])
    assert seen["DataKind"] >= {"numbers", "length", "sum", "average"}
    assert seen["Operator"] >= {"length", "sum", "average"}


def test_examples_are_accepted_by_the_core_spec_parser():
    """The examples are also what crd-sync hands to the core: they must parse there too."""
    from mlynar_events.specs import parse_document

    for path in sorted((DEPLOY / "examples").glob("*.yaml")):
        for obj in _load_yaml_docs(path):
            parse_document(obj)
    parse_document(copy.deepcopy(MLYNAR_DATAKIND))
    parse_document(copy.deepcopy(MLYNAR_OPERATOR))


# --------------------------------------------------------------------------- image


def test_dockerfile_builds_one_non_root_image_from_the_repo_root():
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    froms = [line.split()[1] for line in instructions if line.upper().startswith("FROM ")]
    assert froms and all(f == "python:3.11-slim" for f in froms), froms
    users = [line.split()[1] for line in instructions if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, users
    assert users[-1].split(":")[0].isdigit(), "USER must be numeric so Kubernetes can check runAsNonRoot"
    assert 'ENTRYPOINT ["mlynar"]' in instructions
    assert "docker build -f deploy/Dockerfile -t mlynar-events:latest ." in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!mlynar_events/", "!api/", "!projections/", "!executors/"):
        assert needed in ignore


def test_the_api_answers_for_the_names_in_cluster_clients_use(rendered):
    """The door refuses a Host it does not know: both Services' names must be allowed."""
    [api] = [d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlynar-api"]
    env = {e["name"]: e.get("value") for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}
    allowed = set(env["MLYNAR_ALLOWED_HOST"].split(","))
    services = {d["metadata"]["name"] for d in rendered if d["kind"] == "Service" and d["metadata"]["name"].startswith("mlynar-")}
    assert {"mlynar-api", "mlynar-service"} <= services
    for name in services & {"mlynar-api", "mlynar-service"}:
        assert {name, f"{name}.mlynar.svc", f"{name}.mlynar.svc.cluster.local"} <= allowed
