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
