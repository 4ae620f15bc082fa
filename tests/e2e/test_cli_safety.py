"""CLI safety: reads never create, drop asks first, bare Milvus paths, environment defaults, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m3connect.cli import main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_reads_of_a_missing_collection_fail_and_leave_nothing(tmp_path, capsys, tiny_checkpoint, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for args in (
        ["info", "--uri", "milvus://./m3.db"],
        ["search", "hello", "--uri", "qdrant://./q", "--model", str(tiny_checkpoint)],
        ["drop", "--uri", "./m3.db", "--yes"],
    ):
        code, out, err = _run(capsys, *args)
        assert code == 1 and out == ""
        assert err.count("\n") == 1 and "does not exist" in err, err
    assert list(tmp_path.iterdir()) == []


def test_ingest_then_drop_with_confirmation(tmp_path, capsys, tiny_checkpoint, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"id": f"d{i}", "text": f"text number {i}"}) for i in range(5)) + "\n")
    monkeypatch.setenv("M3_URI", "m3.db")  # a bare *.db path is a Milvus Lite file, as in pymilvus
    monkeypatch.setenv("M3_COLLECTION", "docs")
    code, out, _ = _run(capsys, "ingest", str(data), "--model", str(tiny_checkpoint))
    assert code == 0 and f"milvus://{tmp_path}/m3.db" in out
    code, out, _ = _run(capsys, "info", "--json")
    info = json.loads(out)
    assert code == 0 and info["count"] == 5 and info["location"]["path"] == str(tmp_path / "m3.db")
    code, out, err = _run(capsys, "drop")
    assert code == 2 and "--yes" in err and "5 documents" in err
    code, out, err = _run(capsys, "drop", "--yes")
    assert code == 0 and "dropped" in out
    code, out, err = _run(capsys, "info")
    assert code == 1 and "does not exist" in err


def test_an_input_with_nothing_to_ingest_creates_nothing(tmp_path, capsys, tiny_checkpoint) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(
        capsys, "ingest", str(empty), "--uri", f"qdrant://{tmp_path}/q", "--model", str(tiny_checkpoint)
    )
    assert code == 1 and "no collection was created" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    code, _, err = _run(capsys, "ingest", str(bad), "--uri", f"qdrant://{tmp_path}/q", "--model", str(tiny_checkpoint))
    assert code == 1 and "line 1" in err and "--skip-bad-lines" in err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    ("uri", "hint"),
    [("milvus://rel.db", "milvus://./rel.db"), ("somedir", "qdrant://./somedir"), ("bogus://x", "unknown URI scheme"),
     ("qdrant://host:99999", "port")],
)
def test_uri_mistakes_get_a_hint(uri: str, hint: str, capsys) -> None:
    code, _, err = _run(capsys, "info", "--uri", uri)
    assert code == 2 and hint in err and err.count("\n") == 1


def test_credentials_are_options_and_never_printed(capsys, monkeypatch) -> None:
    monkeypatch.setenv("M3_PASSWORD", "hunter2-secret")
    code, out, err = _run(capsys, "info", "--uri", "opensearch://admin:pw-in-uri-secret@127.0.0.1:9", "--json")
    assert code == 1 and "secret" not in out + err and "cannot reach OpenSearch" in err
    assert Path("m3.db").exists() is False
