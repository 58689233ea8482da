"""The one output-manifest validator, mlynar_events.outputs, on real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlynar_events.outputs import MANIFEST, OutputManifestError, check_kinds, read_output_manifest


def write(out: Path, outputs: object) -> None:
    (out / MANIFEST).write_text(json.dumps({"outputs": outputs}))


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_valid_manifest(out: Path) -> None:
    (out / "a.json").write_text("[1]")
    (out / "sub").mkdir()
    (out / "sub" / "b.txt").write_text("b")
    write(out, [{"dataKind": "k1", "file": "a.json"}, {"dataKind": "k2", "file": "sub/b.txt", "extra": 1}])
    checked = read_output_manifest(out, ["k1", "k2"])
    assert [(c.index, c.data_kind, c.file) for c in checked] == [(0, "k1", "a.json"), (1, "k2", "sub/b.txt")]
    assert checked[1].path == (out / "sub" / "b.txt").resolve()
    write(out, [])
    assert read_output_manifest(out, []) == []


def test_missing_manifest(out: Path) -> None:
    with pytest.raises(OutputManifestError) as ei:
        read_output_manifest(out, [])
    assert "operator wrote no mlynar-out.json in MLYNAR_OUTPUT_DIR" in str(ei.value)
    assert "mlynar-out.json is missing" in str(ei.value)


def test_bad_json(out: Path) -> None:
    (out / MANIFEST).write_text("{nope")
    with pytest.raises(OutputManifestError, match="mlynar-out.json is not valid JSON"):
        read_output_manifest(out)


@pytest.mark.parametrize("doc", [[], {"outputs": {}}, {"outputs": [{"file": "x"}]}, {"outputs": [{"dataKind": "k"}]}])
def test_bad_shape(out: Path, doc: object) -> None:
    (out / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(OutputManifestError, match="mlynar-out.json does not have the shape"):
        read_output_manifest(out)


def test_kind_not_allowed(out: Path) -> None:
    (out / "a").write_text("a")
    write(out, [{"dataKind": "other", "file": "a"}])
    with pytest.raises(OutputManifestError) as ei:
        read_output_manifest(out, ["k"])
    assert "output 0: data kind 'other' is not in the operator's possibleOutputKinds ['k']" in str(ei.value)
    assert len(read_output_manifest(out)) == 1  # no kinds given: not checked
    with pytest.raises(OutputManifestError, match="output 1: data kind 'x'"):
        check_kinds(["k", "x"], ["k"])
    check_kinds(["k"], ["k"])


def test_file_outside_via_dotdot(out: Path) -> None:
    (out.parent / "secret").write_text("s")
    write(out, [{"dataKind": "k", "file": "../secret"}])
    with pytest.raises(OutputManifestError) as ei:
        read_output_manifest(out, ["k"])
    message = str(ei.value)
    assert "output 0: file '../secret' resolves outside MLYNAR_OUTPUT_DIR" in message
    assert "lies outside the output directory" in message


def test_file_outside_via_symlink(out: Path) -> None:
    (out.parent / "secret").write_text("s")
    (out / "p").symlink_to(out.parent / "secret")
    write(out, [{"dataKind": "k", "file": "p"}])
    with pytest.raises(OutputManifestError, match="output 0: file 'p' resolves outside MLYNAR_OUTPUT_DIR"):
        read_output_manifest(out, ["k"])


def test_symlink_inside_is_followed(out: Path) -> None:
    (out / "real").write_text("r")
    (out / "link").symlink_to("real")
    write(out, [{"dataKind": "k", "file": "link"}])
    assert [c.file for c in read_output_manifest(out)] == ["real"]


def test_every_file_problem_is_named(out: Path) -> None:
    (out / "d").mkdir()
    write(out, [{"dataKind": "k", "file": "nope"}, {"dataKind": "k", "file": "d"},
                {"dataKind": "k", "file": MANIFEST}, {"dataKind": "k", "file": "a\x00b"}])
    with pytest.raises(OutputManifestError) as ei:
        read_output_manifest(out)
    message = str(ei.value)
    assert message.startswith("invalid output manifest: ")
    assert "output 0: file 'nope' does not exist" in message
    assert "output 1: file 'd' is not a regular file" in message
    assert "output 2: the manifest itself cannot be an output" in message
    assert "output 3: file 'a\\x00b' contains a NUL character" in message


def test_manifest_symlinked_outside(out: Path) -> None:
    (out.parent / "elsewhere.json").write_text(json.dumps({"outputs": []}))
    (out / MANIFEST).symlink_to(out.parent / "elsewhere.json")
    with pytest.raises(OutputManifestError, match="is not a regular file inside MLYNAR_OUTPUT_DIR"):
        read_output_manifest(out)
