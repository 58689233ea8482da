"""Helpers shared by the example operators: read an input, write an output and the manifest."""

import json
import os
from pathlib import Path


def read_json(env: str):
    return json.loads(Path(os.environ[env]).read_text())


def number(x: float):
    return int(x) if float(x).is_integer() else x


def multiplier() -> float:
    return float(os.environ.get("MULTIPLY_BY", "1"))


def write_outputs(*outputs: tuple[str, str, object]) -> None:
    """outputs: (dataKind, file name, JSON value)."""
    out = Path(os.environ["MLYNAR_OUTPUT_DIR"])
    manifest = []
    for kind, name, value in outputs:
        (out / name).write_text(json.dumps(value, separators=(",", ":")))
        manifest.append({"dataKind": kind, "file": name})
    (out / "mlynar-out.json").write_text(json.dumps({"outputs": manifest}))
