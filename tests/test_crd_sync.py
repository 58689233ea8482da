"""crd-sync against the Kubernetes API stand-in: DataKind/Operator custom resources created,
changed and deleted reach the registry (``GET /api/operators``), live, through the watch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kube_fake import TEST_NAMESPACE, FakeKube
from support import Api, wait_until

NS = TEST_NAMESPACE


def kind(name: str) -> dict[str, Any]:
    return {"apiVersion": "mlynar.dev/v1alpha1", "kind": "DataKind", "metadata": {"name": name, "namespace": NS},
            "spec": {"displayName": name.title()}}


def op(name: str, inputs: list[str], outputs: list[str], args: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"apiVersion": "mlynar.dev/v1alpha1", "kind": "Operator", "metadata": {"name": name, "namespace": NS},
            "spec": {"image": "example/op:1", "args": args or [], "possibleOutputKinds": outputs,
                     "inputs": [{"fileLocationEnv": f"IN_{i}", "dataKind": k} for i, k in enumerate(inputs)], **extra}}


@pytest.fixture
def sync_settings(fake: FakeKube, tmp_path: Path) -> dict[str, Any]:
    return dict(roles=["api", "projector", "crd-sync"], kube_watch_crds=True, kube_namespace=NS,
                kube_config=fake.kubeconfig(tmp_path / "kubeconfig"), registry=[], local_machine=False)


async def operators(api: Api) -> dict[str, dict[str, Any]]:
    status, body = await api.call("GET", "/api/operators")
    assert status == 200
    return {o["metadata"]["name"]: o for o in body}


async def kinds(api: Api) -> set[str]:
    status, body = await api.call("GET", "/api/data-kinds")
    assert status == 200
    return {k["metadata"]["name"] for k in body}


async def test_custom_resources_reach_the_registry_live(fake: FakeKube, make_service, sync_settings, store) -> None:
    # present before crd-sync starts: the initial list (operator first in the API's order does not matter)
    await fake.apply("operators", op("convert", ["csv"], ["hdf5"]))
    await fake.apply("datakinds", kind("hdf5"))
    await fake.apply("datakinds", kind("csv"))
    api = await make_service(**sync_settings)
    await wait_until(lambda: operators(api), what="operator convert")
    assert await kinds(api) == {"csv", "hdf5"}
    assert (await operators(api))["convert"]["revision"] == 1

    # update: a new revision
    await fake.apply("operators", op("convert", ["csv"], ["hdf5"], args=["--fast"]))

    async def revised() -> bool:
        o = (await operators(api)).get("convert")
        return bool(o and o["revision"] == 2 and o["spec"]["args"] == ["--fast"])

    await wait_until(revised, what="revision 2 of convert")

    # an identical spec (e.g. only a label changed) appends nothing
    before = len(await store.read("mlynar.operator.>"))
    same = op("convert", ["csv"], ["hdf5"], args=["--fast"])
    same["metadata"]["labels"] = {"team": "a"}
    await fake.apply("operators", same)
    await fake.apply("datakinds", kind("marker"))
    await wait_until(lambda: _has_kind(api, "marker"), what="marker kind")
    assert len(await store.read("mlynar.operator.>")) == before

    # an invalid object is logged and skipped; the watch goes on
    bad = op("broken", ["csv"], ["hdf5"])
    del bad["spec"]["image"]
    await fake.apply("operators", bad)
    await fake.apply("operators", op("undeclared", ["nope"], []))
    await fake.apply("datakinds", kind("after-bad"))
    await wait_until(lambda: _has_kind(api, "after-bad"), what="a kind applied after the invalid operator")
    assert set(await operators(api)) == {"convert"}

    # an operator waiting for its kind is declared when the kind arrives
    await fake.apply("datakinds", kind("nope"))
    await wait_until(lambda: _has_operator(api, "undeclared"), what="the operator that waited for its kind")

    # delete: a kind still in use stays (Conflict, logged); the operator goes; then the kind can go
    await fake.remove("datakinds", "csv")
    await fake.apply("datakinds", kind("marker-2"))  # same stream: seen after the deletion of csv
    await wait_until(lambda: _has_kind(api, "marker-2"), what="marker-2 kind")
    assert "csv" in await kinds(api)
    await fake.remove("operators", "convert")
    await wait_until(lambda: _lacks_operator(api, "convert"), what="convert to be deleted")
    await fake.apply("datakinds", kind("csv"))
    await fake.remove("datakinds", "csv")
    await wait_until(lambda: _lacks_kind(api, "csv"), what="csv to be deleted")


async def test_resumes_after_410_gone_and_prunes_after_a_restart(fake: FakeKube, make_service, sync_settings) -> None:
    await fake.apply("datakinds", kind("csv"))
    api = await make_service(**sync_settings)
    await wait_until(lambda: _has_kind(api, "csv"), what="csv")
    # the history the watch would resume from is compacted away and the streams drop: 410, re-list
    await fake.put("api/v1", "secrets", {"metadata": {"name": "unrelated"}})  # moves the revision on
    fake.compact()
    await fake.drop_watches()
    await fake.apply("datakinds", kind("json"))
    await wait_until(lambda: _has_kind(api, "json"), what="json after the re-list")
    lists = [q for m, p, q in fake.requests if m == "GET" and p.endswith("/datakinds") and "watch" not in q]
    assert len(lists) >= 2
    # a REST-declared kind is never pruned by crd-sync; a crd-sync one whose resource vanished is
    status, body = await api.call("POST", "/api/data-kinds", json=kind("from-rest"))
    assert status in {200, 201}, body
    await fake.put("api/v1", "secrets", {"metadata": {"name": "unrelated-2"}})
    fake.compact()
    await fake.remove("datakinds", "json")
    await fake.drop_watches()  # the DELETED event may be lost with the stream: the re-list prunes json
    await wait_until(lambda: _lacks_kind(api, "json"), what="json to be deleted")
    assert await kinds(api) == {"csv", "from-rest"}


async def _has_kind(api: Api, name: str) -> bool:
    return name in await kinds(api)


async def _lacks_kind(api: Api, name: str) -> bool:
    return name not in await kinds(api)


async def _has_operator(api: Api, name: str) -> bool:
    return name in await operators(api)


async def _lacks_operator(api: Api, name: str) -> bool:
    return name not in await operators(api)


# The original Mlynar's example Operator (examples/operators/sum/operator.yaml at a596753), verbatim:
# it pins metadata.namespace: default. Its DataKinds (example-kinds.yaml) name no namespace.
ORIGINAL_SUM = {
    "apiVersion": "mlynar.dev/v1alpha1", "kind": "Operator", "metadata": {"name": "sum", "namespace": "default"},
    "spec": {"image": "ffluffyhedgehog/mlynar-example-sum:latest", "possibleOutputKinds": ["number-array-sum-json"],
             "inputs": [{"fileLocationEnv": "INPUT_ARRAY", "dataKind": "number-array-json"}],
             "configurableEnv": [{"name": "MULTIPLY_BY", "defaultValue": "1"}]},
}


def in_namespace(doc: dict[str, Any], namespace: str) -> dict[str, Any]:
    return {**doc, "metadata": {**doc["metadata"], "namespace": namespace}}


async def test_watches_the_listed_namespaces(fake: FakeKube, make_service, sync_settings) -> None:
    """``--kube-watch-namespaces default,<ours>``: the original's example Operator, applied
    unchanged to ``default``, reaches the registry next to the kinds in our namespace; a namespace
    not listed is not watched; one name in two namespaces: the first namespace counts, the other
    takes over when it goes."""
    for name in ("number-array-json", "number-array-sum-json"):
        await fake.apply("datakinds", kind(name))  # into our namespace, as `kubectl apply -f` without -n would
    await fake.apply("operators", ORIGINAL_SUM)
    api = await make_service(**sync_settings, kube_watch_namespaces=f"default,{NS}")
    await wait_until(lambda: _has_operator(api, "sum"), what="the original's operator from namespace default")
    assert (await operators(api))["sum"]["spec"]["image"] == "ffluffyhedgehog/mlynar-example-sum:latest"

    await fake.apply("datakinds", in_namespace(kind("unwatched"), "elsewhere"))
    await fake.apply("datakinds", in_namespace(kind("marker"), "default"))
    await wait_until(lambda: _has_kind(api, "marker"), what="a kind applied to default afterwards")
    assert "unwatched" not in await kinds(api)

    # the same operator in our namespace too: "default" sorts first and keeps counting
    ours = in_namespace(ORIGINAL_SUM, NS)
    ours["spec"] = {**ours["spec"], "image": "example/ours:2"}
    await fake.apply("operators", ours)
    await fake.apply("datakinds", kind("marker-2"))
    await wait_until(lambda: _has_kind(api, "marker-2"), what="marker-2")
    assert (await operators(api))["sum"]["spec"]["image"] == "ffluffyhedgehog/mlynar-example-sum:latest"
    await fake.remove("operators", "sum", namespace="default")

    async def ours_counts() -> bool:
        o = (await operators(api)).get("sum")
        return bool(o and o["spec"]["image"] == "example/ours:2")

    await wait_until(ours_counts, what="the operator in our namespace to take over")
    await fake.remove("operators", "sum")
    await wait_until(lambda: _lacks_operator(api, "sum"), what="sum to be deleted with its last resource")


async def test_watches_all_namespaces(fake: FakeKube, make_service, sync_settings) -> None:
    """``--kube-watch-namespaces '*'``: one cluster-wide list+watch per kind; resources of any
    namespace come and go, and a re-list after 410 Gone prunes what vanished meanwhile."""
    await fake.apply("datakinds", in_namespace(kind("number-array-json"), "team-a"))
    await fake.apply("datakinds", in_namespace(kind("number-array-sum-json"), "default"))
    await fake.apply("operators", ORIGINAL_SUM)
    api = await make_service(**sync_settings, kube_watch_namespaces="*")
    await wait_until(lambda: _has_operator(api, "sum"), what="the operator from default")
    assert {"number-array-json", "number-array-sum-json"} <= await kinds(api)
    paths = {p for m, p, q in fake.requests if m == "GET"}
    assert {"/apis/mlynar.dev/v1alpha1/datakinds", "/apis/mlynar.dev/v1alpha1/operators"} <= paths
    assert not any("/namespaces/" in p for p in paths if "mlynar.dev" in p)

    await fake.apply("datakinds", in_namespace(kind("csv"), "team-b"))
    await wait_until(lambda: _has_kind(api, "csv"), what="a kind applied live in another namespace")
    await fake.remove("datakinds", "csv", namespace="team-b")
    await wait_until(lambda: _lacks_kind(api, "csv"), what="csv to be deleted")

    await fake.apply("datakinds", in_namespace(kind("json"), "team-c"))
    await wait_until(lambda: _has_kind(api, "json"), what="json")
    await fake.put("api/v1", "secrets", {"metadata": {"name": "unrelated"}})
    fake.compact()
    await fake.remove("datakinds", "json", namespace="team-c")
    await fake.drop_watches()  # the DELETED event may be lost with the stream: the re-list prunes json
    await wait_until(lambda: _lacks_kind(api, "json"), what="json to be pruned after the re-list")
    assert "sum" in await operators(api)
