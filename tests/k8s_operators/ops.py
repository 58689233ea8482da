"""Operators for the Kubernetes executor tests, run by the stand-in's ``test/python`` image:
``python ops.py <name>`` with the step environment of docs/ARCHITECTURE.md (inputs in ``<fileLocationEnv>``,
outputs into ``$MLYNAR_OUTPUT_DIR`` with ``mlynar-out.json``)."""

import fcntl
import json
import os
import signal
import sys
from pathlib import Path


def read(env):
    return json.loads(Path(os.environ[env]).read_text())


def write(*outputs):
    out = Path(os.environ["MLYNAR_OUTPUT_DIR"])
    manifest = []
    for kind, name, value in outputs:
        (out / name).write_text(json.dumps(value, separators=(",", ":")))
        manifest.append({"dataKind": kind, "file": name})
    (out / "mlynar-out.json").write_text(json.dumps({"outputs": manifest}))


def num(x):
    return int(x) if float(x).is_integer() else x


m = float(os.environ.get("MULTIPLY_BY", "1"))
op = sys.argv[1]
print(f"operator {op} starting; SOME_ENV_VAR={os.environ.get('SOME_ENV_VAR')}", flush=True)
if op == "sum":
    values = read("INPUT_ARRAY")
    write(("number-array-sum-json", "sum.json", {"sum": num(sum(values) * m)}))
elif op == "length":
    write(("number-array-length-json", "length.json", {"length": num(len(read("INPUT_ARRAY")) * m)}))
elif op == "average":
    s, n = read("INPUT_SUM")["sum"], read("INPUT_LENGTH")["length"]
    write(("number-array-average-json", "average.json", {"average": num(s / n * m)}))
elif op == "fail":
    print("something went badly wrong in the operator", file=sys.stderr, flush=True)
    sys.exit(3)
elif op == "wrong-kind":
    write(("number-array-json", "x.json", [1]))
elif op == "no-manifest":
    pass
elif op == "escape":
    out = Path(os.environ["MLYNAR_OUTPUT_DIR"])
    (out / "mlynar-out.json").write_text(json.dumps({"outputs": [{"dataKind": "number-array-sum-json", "file": "../../etc.json"}]}))
elif op == "symlink-environ":
    # hostile: an output that is a symlink to the upload container's own environment (which holds
    # its step credential); the upload may read any file of its own, so the validator must refuse
    out = Path(os.environ["MLYNAR_OUTPUT_DIR"])
    (out / "leak").symlink_to("/proc/self/environ")
    (out / "mlynar-out.json").write_text(json.dumps({"outputs": [{"dataKind": "number-array-sum-json", "file": "leak"}]}))
elif op == "private":
    # like an image with its own USER and umask 077: prints who it is, edits its input in place,
    # writes its output and manifest readable by itself only (a 0700 directory, 0600 files),
    # naming the file by its absolute path as the original's example operators do
    print(f"operator private running as uid {os.getuid()} gid {os.getgid()}", flush=True)
    source = Path(os.environ["INPUT_ARRAY"])
    values = json.loads(source.read_text())
    with open(source, "r+") as f:  # in place: needs write permission on the input
        f.seek(0)
        f.write(json.dumps(values + [0]))
        f.truncate()
    os.umask(0o077)
    out = Path(os.environ["MLYNAR_OUTPUT_DIR"]) / "private"
    out.mkdir()
    result = out / "sum.json"
    result.write_text(json.dumps({"sum": num(sum(json.loads(source.read_text())) * m)}, separators=(",", ":")))
    manifest = {"outputs": [{"dataKind": "number-array-sum-json", "file": str(result)}]}
    (out.parent / "mlynar-out.json").write_text(json.dumps(manifest))
    print(f"wrote {result} with mode {oct(result.stat().st_mode & 0o777)}", flush=True)
elif op == "gate":
    # blocks until the test releases its lock on the gate file, then behaves like sum; an alarm
    # (SIGALRM ends the process) gives up after 60 s rather than hang
    fd = os.open(sys.argv[2], os.O_RDONLY)
    signal.alarm(60)
    fcntl.flock(fd, fcntl.LOCK_EX)
    signal.alarm(0)
    values = read("INPUT_ARRAY")
    write(("number-array-sum-json", "sum.json", {"sum": num(sum(values) * m)}))
else:
    sys.exit(f"unknown test operator {op}")
