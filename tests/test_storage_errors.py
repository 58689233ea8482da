"""A full or read-only blob disk during an upload is said as such (507/503), and nothing is recorded."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from mlynar_events.events import SUBJECT_PREFIX, DataUnitAdded

KIND = "number-array-json"


async def test_a_full_disk_is_507_and_records_nothing(make_service, small_disk: Path) -> None:
    api = await make_service(blob_dir=small_disk / "blobs")
    run_id = await api.create_run()
    head = await api.service.store.last_seq()
    status, body = await api.upload(run_id, KIND, b"[" + b"1," * 1024 * 1024 + b"1]")  # 2 MiB
    assert status == 507, body
    assert body["error"] == "no space left to store the data" and body["detail"]["errno"] == "ENOSPC"
    units = [e for e in await api.service.store.read(f"{SUBJECT_PREFIX}.run.{run_id}.>")
             if isinstance(e.event, DataUnitAdded)]
    assert units == [] and await api.service.store.last_seq() == head
    assert [p for p in (small_disk / "blobs").rglob("*") if p.is_file()] == []  # the partial file is gone
    assert (await api.upload(run_id, KIND, b"[1,2,3]"))[0] == 201  # and the space is there again


async def test_a_read_only_disk_is_503(make_service, small_disk: Path) -> None:
    api = await make_service(blob_dir=small_disk / "blobs")
    run_id = await api.create_run()
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_disk)]).returncode == 0
    try:
        status, body = await api.upload(run_id, KIND, b"[1,2,3]")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=False)
    assert status == 503 and body["error"] == "the data store is read-only", body
    assert os.listdir(small_disk / "blobs" / ".tmp") == []
