"""The Kubernetes executor end to end against the Kubernetes API stand-in (tests/kube_fake.py):
the real service (API, solver, executor) configured by a kubeconfig, the real wrapper running the
download/upload containers against the real API, operators as ``test/python`` images."""

from __future__ import annotations

import fcntl
import socket
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest
import yaml

from executors.kubernetes import manifests
from executors.worker import DURABLE
from kube_fake import TEST_NAMESPACE, TOKEN, FakeKube
from mlynar_events import credentials
from mlynar_events.events import STREAM
from mlynar_events.secrets import SecretStore
from mlynar_events.serve import Service
from support import EXAMPLES, Api, service_settings, wait_until

OPS = Path(__file__).resolve().parent / "k8s_operators" / "ops.py"
NS = TEST_NAMESPACE
README_PARAMS = {op: [{"name": "MULTIPLY_BY", "defaultValue": "1", "value": v}]
                 for op, v in (("length", "3"), ("sum", "5"), ("average", "2"))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def operator(name: str, op: str | None = None, *, image: str = "test/python", inputs: list[tuple[str, str]] | None = None,
             outputs: list[str] | None = None, args: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "image": image,
        "args": args if args is not None else [str(OPS), op or name],
        "inputs": [{"fileLocationEnv": env, "dataKind": kind} for env, kind in (inputs or [("INPUT_FILE", "fail-input")])],
        "possibleOutputKinds": outputs or [],
        **extra,
    }
    return {"apiVersion": "mlynar.dev/v1alpha1", "kind": "Operator", "metadata": {"name": name}, "spec": spec}


def readme_operators() -> list[dict[str, Any]]:
    arr = [("INPUT_ARRAY", "number-array-json")]
    mult = [{"name": "MULTIPLY_BY", "defaultValue": "1"}]
    return [
        operator("sum", inputs=arr, outputs=["number-array-sum-json"], configurableEnv=mult,
                 constantEnv=[{"name": "SOME_ENV_VAR", "value": "SOME_VALUE"}], timeoutSeconds=60),
        operator("length", inputs=arr, outputs=["number-array-length-json"], configurableEnv=mult),
        operator("average", inputs=[("INPUT_SUM", "number-array-sum-json"), ("INPUT_LENGTH", "number-array-length-json")],
                 outputs=["number-array-average-json"], configurableEnv=mult,
                 resources={"requests": {"cpu": "100m"}, "limits": {"memory": "128Mi"}}),
    ]


@pytest.fixture
def kube_settings(fake: FakeKube, tmp_path: Path) -> dict[str, Any]:
    registry = tmp_path / "k8s-operators.yaml"
    registry.write_text(yaml.safe_dump_all(readme_operators()))
    port = free_port()
    return dict(kube_config=fake.kubeconfig(tmp_path / "kubeconfig"), kube_namespace=NS,
                kube_wrapper_image=fake.wrapper_image, kube_api_url=f"http://127.0.0.1:{port}", port=port,
                registry=[EXAMPLES / "datakinds.yaml", registry], local_machine=False)


class Gate:
    """A file whose lock the test holds: the ``gate`` test operator (``ops.py gate PATH``) blocks
    on it, without polling, until :meth:`open`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._held = path.open("w")
        fcntl.flock(self._held, fcntl.LOCK_EX)

    def open(self) -> None:
        fcntl.flock(self._held, fcntl.LOCK_UN)

    def close(self) -> None:
        self._held.close()


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Gate]:
    g = Gate(tmp_path / "gate")
    yield g
    g.close()


@pytest.fixture
async def kube(fake: FakeKube, make_service, kube_settings):  # type: ignore[no-untyped-def]
    async def start(**overrides: Any) -> Api:
        return await make_service(**{**kube_settings, **overrides})
    return start


async def declare(api: Api, doc: dict[str, Any]) -> None:
    status, body = await api.call("POST", "/api/operators", json=doc)
    assert status in {200, 201}, body


async def one_step_run(api: Api, kind: str = "fail-input", data: bytes = b"x") -> tuple[str, dict[str, Any]]:
    run_id = await api.create_run()
    status, body = await api.upload(run_id, kind, data)
    assert status == 201, body
    status, body = await api.call("POST", f"/api/run/{run_id}/run", json={})
    assert status == 200, body
    return run_id, body


async def wait_step(api: Api, run_id: str, *statuses: str, timeout: float = 20.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        run = await api.run(run_id)
        return next((s for s in run["steps"] if s["status"] in statuses), None)

    return await wait_until(check, timeout, what=f"a step of {run_id} to be {statuses}")


def job_objects_gone(fake: FakeKube) -> bool:
    return not (fake.list("jobs") or fake.list("pods") or fake.list("persistentvolumeclaims") or fake.list("secrets"))


def first_version(fake: FakeKube, plural: str, name: str) -> dict[str, Any]:
    return next(obj for _, key, kind, obj in fake.events if key[1] == plural and key[3] == name and kind == "ADDED")


async def operator_running(fake: FakeKube) -> dict[str, Any] | None:
    for pod in fake.list("pods"):
        for st in pod["status"].get("initContainerStatuses", []):
            if manifests.container_role(st["name"]) == "operator" and "running" in st["state"]:
                return pod
    return None


# ---- success --------------------------------------------------------------------------------------


async def test_mlynar_readme_flow_runs_as_jobs(kube, fake: FakeKube) -> None:
    api = await kube()
    run_id = await api.create_run()
    status, unit = await api.upload(run_id, "number-array-json", b"[1,2,3,4,5]", filename="numbers.json")
    assert status == 201, unit
    status, body = await api.call("POST", f"/api/run/{run_id}/run", json=README_PARAMS)
    assert status == 200, body
    run = await api.wait_status(run_id, "complete", "terminated", timeout=40)
    assert run["status"] == "complete"
    assert {s["operator"]: s["status"] for s in run["steps"]} == {"sum": "success", "length": "success", "average": "success"}
    average = next(u for u in run["dataPool"] if u["dataKind"] == "number-array-average-json")
    assert await api.content(average["url"]) == b'{"average":10}'
    assert sorted(average["ancestors"]) == ["average", "length", "sum"]

    # one Job, PVC and Secret per step, named after the step, all cleaned up afterwards
    steps = {s["operator"]: s for s in run["steps"]}
    assert {name for (plural, name) in fake.created if plural == "jobs"} == {s["jobName"] for s in run["steps"]}
    assert all(n == 1 for n in fake.created.values())
    assert {name for (plural, name) in fake.created if plural == "persistentvolumeclaims"} == {s["pvcName"] for s in run["steps"]}
    await wait_until(lambda: _async(job_objects_gone(fake)), what="jobs, pods, PVCs and secrets to be deleted")
    job_deletes = [q for m, p, q in fake.requests if m == "DELETE" and "/jobs/" in p]
    assert job_deletes and all("propagationPolicy=Background" in q for q in job_deletes)

    # the Job as created: labels, backoffLimit, deadline, the three containers, env order, volume
    sum_step = steps["sum"]
    job_name = sum_step["jobName"]
    job = first_version(fake, "jobs", job_name)
    labels = job["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "mlynar"
    assert labels["mlynar.dev/run"] == run_id and labels["mlynar.dev/step"] == sum_step["id"]
    # the original's labels too: its users select a run's pods with -l run=<id>, all with -l mlynar=step
    pod = first_version(fake, "pods", next(n for (p, n) in _pods_of(fake, job_name)))
    for obj in (job, job["spec"]["template"], pod, first_version(fake, "persistentvolumeclaims", sum_step["pvcName"])):
        assert obj["metadata"]["labels"]["run"] == run_id and obj["metadata"]["labels"]["mlynar"] == "step"
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 60
    pod_spec = job["spec"]["template"]["spec"]
    # the original's container names and paths: PVC at /data, inputs /data/<unitId>, outputs /data/output
    assert [c["name"] for c in pod_spec["initContainers"]] == [f"{job_name}-download", f"{job_name}-operator"]
    assert [c["name"] for c in pod_spec["containers"]] == [f"{job_name}-upload"]
    assert all(c["volumeMounts"] == [{"name": "work", "mountPath": "/data"}]
               for c in pod_spec["initContainers"] + pod_spec["containers"])
    assert pod_spec["initContainers"][0]["image"] == fake.wrapper_image
    assert pod_spec["initContainers"][0]["command"] == ["python", "-m", "executors.kubernetes.wrapper", "download"]
    op = pod_spec["initContainers"][1]
    assert op["image"] == "test/python" and op["args"] == [str(OPS), "sum"]
    assert "securityContext" not in op, "the operator runs as its image's USER"
    assert [e["name"] for e in op["env"]] == ["SOME_ENV_VAR", "MULTIPLY_BY", "INPUT_ARRAY", "MLYNAR_OUTPUT_DIR"]
    env = {e["name"]: e["value"] for e in op["env"]}
    assert env["MULTIPLY_BY"] == "5" and env["INPUT_ARRAY"] == f"/data/{unit['id']}"
    assert env["MLYNAR_OUTPUT_DIR"] == "/data/output"
    assert not any("CREDENTIAL" in e["name"] for e in op["env"]), "the operator never sees the step credential"
    assert pod_spec["volumes"] == [{"name": "work", "persistentVolumeClaim": {"claimName": sum_step["pvcName"]}}]
    upload_env = {e["name"]: e for e in pod_spec["containers"][0]["env"]}
    assert upload_env["MLYNAR_STEP_CREDENTIAL"]["valueFrom"]["secretKeyRef"]["name"] == f"{sum_step['jobName']}-cred"
    average_job = first_version(fake, "jobs", steps["average"]["jobName"])
    assert average_job["spec"]["template"]["spec"]["initContainers"][1]["resources"] == {
        "requests": {"cpu": "100m"}, "limits": {"memory": "128Mi"}}
    assert "activeDeadlineSeconds" not in average_job["spec"]
    pvc = first_version(fake, "persistentvolumeclaims", sum_step["pvcName"])
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"

    # the operator's own output is the step log
    status, logs = await api.call("GET", f"/api/run/{run_id}/steps/{sum_step['id']}/logs")
    assert status == 200
    assert "operator sum starting; SOME_ENV_VAR=SOME_VALUE" in logs
    assert "returned 1 output(s)" in logs


async def _async(value: Any) -> Any:
    return value


def _pods_of(fake: FakeKube, job: str) -> list[tuple[str, str]]:
    """(plural, name) of every pod the stand-in's Job controller created for ``job``."""
    return [("pods", obj["metadata"]["name"]) for _, key, kind, obj in fake.events
            if key[1] == "pods" and kind == "ADDED" and obj["metadata"]["labels"].get("job-name") == job]


async def test_operator_image_of_another_uid_with_private_outputs(kube, fake: FakeKube) -> None:
    """An operator image with its own ``USER`` (here uid 1000, the ``node`` user of the original's
    example images) that edits its input in place and writes 0600 outputs in a 0700 directory:
    the step succeeds, the upload reads what it wrote. The stand-in runs every container as the
    uid Kubernetes would and enforces file permissions and capabilities for real."""
    if not fake.honours_users:
        pytest.skip("the Kubernetes stand-in switches uids only when the tests run as root")
    fake.image_users["test/python:node"] = (1000, 1000)
    api = await kube()
    await declare(api, operator("private", image="test/python:node", inputs=[("INPUT_ARRAY", "number-array-json")],
                                outputs=["number-array-sum-json"]))
    for name in ("sum", "length", "average"):  # only this operator consumes the kind
        assert (await api.call("DELETE", f"/api/operators/{name}"))[0] == 200
    run_id, _ = await one_step_run(api, "number-array-json", b"[1,2,3]")
    step = await wait_step(api, run_id, "success", "failure", timeout=30)
    status, logs = await api.call("GET", f"/api/run/{run_id}/steps/{step['id']}/logs")
    assert step["status"] == "success", (step.get("error"), logs)
    assert "operator private running as uid 1000 gid 1000" in logs and "with mode 0o600" in logs
    run = await api.run(run_id)
    (out,) = [u for u in run["dataPool"] if u["dataKind"] == "number-array-sum-json"]
    assert await api.content(out["url"]) == b'{"sum":6}'
    job = first_version(fake, "jobs", step["jobName"])["spec"]["template"]["spec"]
    upload = job["containers"][0]["securityContext"]
    assert upload["runAsUser"] == 0 and upload["capabilities"] == {"drop": ["ALL"], "add": ["DAC_OVERRIDE"]}
    assert upload["allowPrivilegeEscalation"] is False and upload["readOnlyRootFilesystem"] is True
    assert job["initContainers"][0]["securityContext"]["runAsUser"] == manifests.WRAPPER_UID


async def test_stand_in_runs_containers_as_their_uid_with_their_capabilities(fake: FakeKube) -> None:
    """The stand-in's uid/capability model itself (what the test above relies on): a root
    container without DAC_OVERRIDE cannot read another uid's 0600 file, with it it can, and
    runAsNonRoot refuses root."""
    if not fake.honours_users:
        pytest.skip("the Kubernetes stand-in switches uids only when the tests run as root")
    fake.image_users["test/python:node"] = (1000, 1000)
    script = ("import os,sys,pathlib; p=pathlib.Path(sys.argv[1]); "
              "(p.write_text('secret'), p.chmod(0o600)) if sys.argv[2]=='write' else print(p.read_text()); "
              "print('uid', os.getuid(), 'groups', sorted(os.getgroups()))")

    def container(name: str, image: str, mode: str, **sc: Any) -> dict[str, Any]:
        c = {"name": name, "image": image, "args": ["-c", script, "/data/f", mode],
             "volumeMounts": [{"name": "v", "mountPath": "/data"}]}
        return {**c, "securityContext": sc} if sc else c

    async def create(plural: str, obj: dict[str, Any]) -> None:
        group = "apis/batch/v1" if plural == "jobs" else "api/v1"
        async with aiohttp.ClientSession(fake.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            async with http.post(f"/{group}/namespaces/{NS}/{plural}", json=obj) as resp:
                assert resp.status == 201, await resp.text()

    async def run_job(name: str, reader: dict[str, Any]) -> dict[str, Any]:
        await create("persistentvolumeclaims", {"metadata": {"name": f"{name}-pvc"}, "spec": {"resources": {"requests": {"storage": "1Gi"}}}})
        await create("jobs", {"metadata": {"name": name}, "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never", "securityContext": {"fsGroup": 4242},
            "initContainers": [container("writer", "test/python:node", "write")], "containers": [reader],
            "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": f"{name}-pvc"}}]}}}})

        def finished() -> dict[str, Any] | None:
            pods = [p for p in fake.list("pods", NS) if p["metadata"]["labels"].get("job-name") == name]
            return pods[0] if pods and pods[0]["status"].get("phase") in {"Succeeded", "Failed"} else None

        return await wait_until(lambda: _async(finished()), 20, what=f"job {name} to finish")

    def log(pod: dict[str, Any], c: str) -> str:
        return fake._log_path(pod, c).read_text()

    pod = await run_job("no-caps", container("reader", "test/python", "read", runAsUser=0, capabilities={"drop": ["ALL"]}))
    assert pod["status"]["phase"] == "Failed" and "PermissionError" in log(pod, "reader")
    assert "uid 1000 groups [4242]" in log(pod, "writer")
    pod = await run_job("dac", container("reader", "test/python", "read", runAsUser=0,
                                         capabilities={"drop": ["ALL"], "add": ["DAC_OVERRIDE"]}))
    assert pod["status"]["phase"] == "Succeeded" and log(pod, "reader").startswith("secret")
    pod = await run_job("other-uid", container("reader", "test/python", "read", runAsUser=2000))
    assert pod["status"]["phase"] == "Failed" and "PermissionError" in log(pod, "reader")

    refused = container("reader", "test/python", "read", runAsNonRoot=True)
    await create("jobs", {"metadata": {"name": "root"},
                          "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [refused]}}}})

    def waiting_reason() -> str | None:
        pods = [p for p in fake.list("pods", NS) if p["metadata"]["labels"].get("job-name") == "root"]
        statuses = pods[0]["status"].get("containerStatuses") if pods else None
        return (statuses[0]["state"].get("waiting") or {}).get("reason") if statuses else None

    await wait_until(lambda: _async(waiting_reason() == "CreateContainerConfigError" or None), 10,
                     what="runAsNonRoot to refuse a root container")


async def test_storage_class_and_pvc_size_from_settings(kube, fake: FakeKube) -> None:
    api = await kube(kube_storage_class="fast-ssd", kube_pvc_size="5Gi")
    await declare(api, operator("noop", "no-manifest"))
    run_id, _ = await one_step_run(api)
    step = await wait_step(api, run_id, "success", "failure")
    pvc = first_version(fake, "persistentvolumeclaims", step["pvcName"])
    assert pvc["spec"]["storageClassName"] == "fast-ssd"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"


# ---- failures ------------------------------------------------------------------------------------


async def test_operator_failure_shows_exit_code_and_logs(kube, fake: FakeKube) -> None:
    api = await kube()
    await declare(api, operator("breaks", "fail"))
    run_id, _ = await one_step_run(api)
    step = await wait_step(api, run_id, "failure")
    assert "operator container exited with code 3" in step["error"]
    assert "something went badly wrong" in step["error"]
    status, logs = await api.call("GET", f"/api/run/{run_id}/steps/{step['id']}/logs")
    assert status == 200 and "something went badly wrong in the operator" in logs
    await wait_until(lambda: _async(job_objects_gone(fake)), what="the failed job to be deleted")


async def test_keep_failed_jobs(kube, fake: FakeKube) -> None:
    api = await kube(kube_keep_failed_jobs=True)
    await declare(api, operator("breaks", "fail"))
    run_id, _ = await one_step_run(api)
    step = await wait_step(api, run_id, "failure")
    assert fake.get("jobs", step["jobName"]) is not None
    assert fake.get("persistentvolumeclaims", step["pvcName"]) is not None


@pytest.mark.parametrize("op, message", [
    ("wrong-kind", "data kind 'number-array-json' is not in the operator's possibleOutputKinds"),
    ("no-manifest-kind", "mlynar-out.json is missing"),
    ("escape", "lies outside the output directory"),
    ("symlink-environ", "lies outside the output directory"),
])
async def test_bad_output_manifest_fails_the_upload_container(kube, store, op: str, message: str) -> None:
    api = await kube()
    script = "no-manifest" if op == "no-manifest-kind" else op
    # no-manifest with an output kind declared: the manifest is required
    await declare(api, operator(op, script, outputs=["number-array-sum-json"]))
    run_id, _ = await one_step_run(api)
    step = await wait_step(api, run_id, "failure")
    assert "output upload (wrapper container 'upload') exited with code 1" in step["error"]
    assert message in step["error"]
    assert await store.read(f"mlynar.run.{run_id}.StepOutputReturned") == [], "nothing reached the API"


async def test_image_pull_failure_names_the_image(kube, fake: FakeKube) -> None:
    api = await kube()
    await declare(api, operator("ghost", image="missing/image:1.2"))
    run_id, _ = await one_step_run(api)
    step = await wait_step(api, run_id, "failure")
    assert "'missing/image:1.2'" in step["error"]
    assert "ImagePullBackOff" in step["error"] or "ErrImagePull" in step["error"]
    await wait_until(lambda: _async(job_objects_gone(fake)), what="the job to be deleted")


async def test_deadline_exceeded(kube) -> None:
    api = await kube()
    await declare(api, operator("slow", image="test/sleep", args=[], timeoutSeconds=1))
    run_id, _ = await one_step_run(api)
    step = await wait_step(api, run_id, "failure")
    assert "timeoutSeconds (1s)" in step["error"] and "DeadlineExceeded" in step["error"]


async def test_oom_killed(kube) -> None:
    api = await kube()
    await declare(api, operator("hungry", image="test/oom", args=[], resources={"limits": {"memory": "64Mi"}}))
    run_id, _ = await one_step_run(api)
    step = await wait_step(api, run_id, "failure")
    assert "OOMKilled" in step["error"] and "64Mi" in step["error"] and "out of memory" in step["error"]


@pytest.mark.parametrize("code, text", [(403, "403 Forbidden"), (500, "500")])
async def test_api_server_errors_fail_the_step_with_the_status(kube, fake: FakeKube, code: int, text: str) -> None:
    api = await kube()
    await declare(api, operator("any", "fail"))
    fake.fail_with = code
    run_id, _ = await one_step_run(api)
    step = await wait_step(api, run_id, "failure")
    assert step["error"].startswith("kubernetes API ") and text in step["error"], step["error"]
    fake.fail_with = None
    assert not fake.created


# ---- cancel and re-attach ------------------------------------------------------------------------


async def test_cancel_deletes_the_job_and_its_pods(kube, fake: FakeKube) -> None:
    api = await kube()
    await declare(api, operator("forever", image="test/sleep", args=[]))
    run_id, _ = await one_step_run(api)
    pod = await wait_until(lambda: operator_running(fake), what="the operator container to run")
    status, body = await api.call("POST", f"/api/run/{run_id}/terminate?cancel=true")
    assert status == 200, body
    step = await wait_step(api, run_id, "cancelled")
    await wait_until(lambda: _async(job_objects_gone(fake)), what="job, pod, pvc and secret to be deleted")
    assert fake.get("pods", pod["metadata"]["name"]) is None
    assert any(m == "DELETE" and p.endswith(f"/jobs/{step['jobName']}") and "propagationPolicy=Background" in q
               for m, p, q in fake.requests)


async def test_executor_restart_reattaches_to_the_running_job(fake: FakeKube, kube_settings, make_service, store,
                                                               tmp_path: Path, nats_url: str, gate: Gate) -> None:
    settings = service_settings(tmp_path, nats_url, **kube_settings)
    first = Service(settings)
    await first.start()
    try:
        async with aiohttp.ClientSession(first.api_url) as http:
            api1 = Api(http, first)
            await declare(api1, operator("gated", args=[str(OPS), "gate", str(gate.path)], inputs=[("INPUT_ARRAY", "number-array-json")],
                                         outputs=["number-array-sum-json"]))
            # only the gated operator consumes this kind
            for name in ("sum", "length", "average"):
                assert (await api1.call("DELETE", f"/api/operators/{name}"))[0] == 200
            run_id, _ = await one_step_run(api1, "number-array-json", b"[1,2,3]")
            await wait_until(lambda: operator_running(fake), what="the operator container to run")
    finally:
        await first.stop()
    jobs = [name for (plural, name) in fake.created if plural == "jobs"]
    assert len(jobs) == 1
    # the stopped executor never acked the step: make JetStream redeliver it now instead of after
    # ack_wait (what a crashed executor's replacement sees a little later)
    await store.js.delete_consumer(STREAM, DURABLE)
    api2 = await make_service(**kube_settings)
    step = await wait_step(api2, run_id, "running")
    gate.open()
    run = await api2.wait_status(run_id, "complete", timeout=30)
    assert [s["status"] for s in run["steps"]] == ["success"]
    sums = [u for u in run["dataPool"] if u["dataKind"] == "number-array-sum-json"]
    assert len(sums) == 1 and await api2.content(sums[0]["url"]) == b'{"sum":6}'
    assert fake.created[("jobs", jobs[0])] == 1 and [n for (p, n) in fake.created if p == "jobs"] == jobs
    assert step["jobName"] == jobs[0]


# ---- the returns route ---------------------------------------------------------------------------


async def test_returns_route_checks_credential_kind_and_state(kube, fake: FakeKube, store) -> None:
    api = await kube(max_upload_bytes=1000)
    await declare(api, operator("waits", image="test/sleep", args=[], outputs=["number-array-sum-json"]))
    run_id, _ = await one_step_run(api, data=b"input-bytes")
    await wait_until(lambda: operator_running(fake), what="the operator container to run")
    step = await wait_step(api, run_id, "running")
    sid = step["id"]
    key = await (await SecretStore.open(store.js)).get_or_create(credentials.KEY_NAME)
    good = {"Authorization": f"Bearer {credentials.step_credential(key, run_id, sid, 1)}"}
    base = f"/api/run/{run_id}/returns/{sid}"

    status, body = await api.call("GET", f"{base}/inputs/0?attempt=1", headers=good)
    assert status == 200 and body == "input-bytes"
    assert (await api.call("GET", f"{base}/inputs/1?attempt=1", headers=good))[0] == 404
    assert (await api.call("GET", f"{base}/inputs/0?attempt=1"))[0] == 401
    status, body = await api.call("GET", f"{base}/inputs/0?attempt=1", headers={"Authorization": "Bearer nope"})
    assert status == 403 and "credential" in body["error"]
    # a credential of another step or attempt is worthless here
    other = {"Authorization": f"Bearer {credentials.step_credential(key, run_id, 'other', 1)}"}
    assert (await api.call("POST", f"{base}/number-array-sum-json?attempt=1&index=0", data=b"1", headers=other))[0] == 403
    assert (await api.call("POST", f"{base}/number-array-sum-json?attempt=2&index=0", data=b"1", headers=good))[0] == 403
    attempt2 = {"Authorization": f"Bearer {credentials.step_credential(key, run_id, sid, 2)}"}
    status, body = await api.call("POST", f"{base}/number-array-sum-json?attempt=2&index=0", data=b"1", headers=attempt2)
    assert status == 409 and "not running attempt 2" in body["error"]

    status, body = await api.call("POST", f"{base}/number-array-json?attempt=1&index=0", data=b"1", headers=good)
    assert status == 400 and "possibleOutputKinds" in body["error"]
    status, body = await api.call("POST", f"{base}/number-array-sum-json?attempt=1&index=x", data=b"1", headers=good)
    assert status == 400
    status, body = await api.call("POST", f"{base}/number-array-sum-json?attempt=1&index=0", data=b"x" * 2000, headers=good)
    assert status == 413
    before = await store.last_seq()
    status, body = await api.call("POST", f"{base}/number-array-sum-json?attempt=1&index=0&filename=s.json",
                                  data=b'{"sum":1}', headers=good)
    assert status == 201 and body["size"] == 9 and body["filename"] == "s.json", body
    status, _ = await api.call("POST", f"{base}/number-array-sum-json?attempt=1&index=0&filename=s.json",
                               data=b'{"sum":1}', headers=good)
    assert status == 200  # a retried upload of the same bytes is fine
    status, _ = await api.call("POST", f"{base}/number-array-sum-json?attempt=1&index=0", data=b"other", headers=good)
    assert status == 409
    returned = [e for e in await store.read(f"mlynar.run.{run_id}.StepOutputReturned", before + 1)]
    assert len(returned) == 1 and returned[0].event.index == 0

    status, _ = await api.call("POST", f"/api/run/{run_id}/terminate?cancel=true")
    await wait_step(api, run_id, "cancelled")
    status, body = await api.call("POST", f"{base}/number-array-sum-json?attempt=1&index=1", data=b"1", headers=good)
    assert status == 409 and "cancelled" in body["error"]
    assert (await api.call("GET", f"{base}/inputs/0?attempt=1", headers=good))[0] == 409
