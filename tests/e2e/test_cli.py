"""The ``m3connect`` command line, run in-process through ``main([...])``, and the eval metrics."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from m3connect import evaluation as ev
from m3connect.cli import main
from m3connect.testing import sample_corpus

REPO = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("m3connect: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def model(tiny_checkpoint: Path) -> str:
    return str(tiny_checkpoint)


@pytest.fixture
def sample_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "sample.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for doc in sample_corpus():
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return path


def _info(capsys: pytest.CaptureFixture[str], uri: str, collection: str) -> dict:
    rc, out, err = run(capsys, "info", "--uri", uri, "--collection", collection, "--json")
    assert rc == 0, err
    return json.loads(out)


# -- ingest -----------------------------------------------------------------------------------


def test_ingest_jsonl_resume_search_info(capsys, tmp_path, model, sample_jsonl):
    uri = f"qdrant://{tmp_path}/q"
    base = ["--uri", uri, "--collection", "docs", "--model", model]
    rc, out, err = run(capsys, "ingest", str(sample_jsonl), *base)
    assert rc == 0, err
    assert "40 read, 40 written, 0 skipped" in out
    assert "docs/s" in out and "encode" in out and "write" in out
    assert "now holds 40 documents" in out

    # Resumable by default: the second run writes nothing and the count stays put.
    rc, out, err = run(capsys, "ingest", str(sample_jsonl), *base)
    assert rc == 0, err
    assert "0 written, 40 skipped" in out
    assert _info(capsys, uri, "docs")["count"] == 40

    # --no-resume rewrites (still no duplicates: same ids).
    rc, out, err = run(capsys, "ingest", str(sample_jsonl), *base, "--no-resume", "--json")
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["written"] == 40 and summary["skipped"] == 0 and summary["count"] == 40

    rc, out, err = run(capsys, "search", "Qdrant sparse vectors", *base, "-k", "5")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["rank", "id", "score", "dense", "sparse", "colbert", "text"]
    assert len(lines) == 6
    assert lines[1].split()[0] == "1"

    rc, out, err = run(capsys, "search", "Qdrant sparse vectors", *base, "-k", "7", "--json",
                       "--weights", "0.4,0.2,0.4", "--filter", '{"lang": "en"}')
    assert rc == 0, err
    data = json.loads(out)
    assert data["weights"] == [0.4, 0.2, 0.4]
    hits = data["hits"]
    assert [h["rank"] for h in hits] == list(range(1, 8))
    assert all(h["metadata"]["lang"] == "en" for h in hits)
    assert all(set(h["scores"]) == {"dense", "sparse", "colbert"} for h in hits)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    # exact fusion: the hit score is the weighted mean of the route scores
    h = hits[0]
    expect = (0.4 * h["scores"]["dense"] + 0.2 * h["scores"]["sparse"] + 0.4 * h["scores"]["colbert"]) / 1.0
    assert h["score"] == pytest.approx(expect, abs=1e-5)

    rc, out, err = run(capsys, "search", "rain", *base, "--fusion", "rrf", "--json", "-k", "3")
    assert rc == 0, err
    assert len(json.loads(out)["hits"]) == 3

    info = _info(capsys, uri, "docs")
    assert info["engine"] == "qdrant" and info["collection"] == "docs"
    assert info["spec"]["model"] == model and info["spec"]["dense_dim"] == 32
    rc, out, err = run(capsys, "info", "--uri", uri, "--collection", "docs", "--model", model)
    assert rc == 0, err
    assert "documents:     40" in out and "matches the collection" in out


def test_ingest_csv_with_field_options(capsys, tmp_path, model):
    path = tmp_path / "docs.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "body", "lang", "topic"])
        for doc in sample_corpus()[:12]:
            w.writerow([doc["id"], doc["text"], doc["lang"], doc["topic"]])
    uri = f"qdrant://{tmp_path}/q"
    rc, out, err = run(capsys, "ingest", str(path), "--uri", uri, "--collection", "c", "--model", model,
                       "--text-field", "body", "--id-field", "key", "--metadata-fields", "lang", "--json")
    assert rc == 0, err
    assert json.loads(out)["written"] == 12
    rc, out, err = run(capsys, "search", "river", "--uri", uri, "--collection", "c", "--model", model, "--json")
    hits = json.loads(out)["hits"]
    assert {h["id"] for h in hits} <= {d["id"] for d in sample_corpus()[:12]}
    assert all(set(h["metadata"]) == {"lang"} for h in hits)


def test_ingest_parquet(capsys, tmp_path, model):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = sample_corpus()[:10]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist(docs), path)
    uri = f"qdrant://{tmp_path}/q"
    rc, out, err = run(capsys, "ingest", str(path), "--uri", uri, "--collection", "p", "--model", model)
    assert rc == 0, err
    assert "10 written" in out
    assert _info(capsys, uri, "p")["count"] == 10


def test_ingest_directory_ids_are_relative_paths(capsys, tmp_path, model):
    root = tmp_path / "notes"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("The river flooded the valley after heavy rain.", encoding="utf-8")
    (root / "sub" / "b.md").write_text("# Bread\nSourdough needs a starter and a hot oven.", encoding="utf-8")
    (root / "c.bin").write_bytes(b"\x00\x01")
    uri = f"qdrant://{tmp_path}/q"
    base = ["--uri", uri, "--collection", "d", "--model", model]
    rc, out, err = run(capsys, "ingest", str(root), *base)
    assert rc == 0, err
    assert "2 written" in out
    rc, out, err = run(capsys, "search", "bread oven", *base, "--json")
    assert {h["id"] for h in json.loads(out)["hits"]} == {"a.txt", "sub/b.md"}


def test_ingest_without_id_field_uses_content_ids(capsys, tmp_path, model):
    path = tmp_path / "noid.jsonl"
    path.write_text("".join(json.dumps({"text": d["text"], "lang": d["lang"]}) + "\n" for d in sample_corpus()[:5]))
    uri = f"qdrant://{tmp_path}/q"
    base = ["--uri", uri, "--collection", "n", "--model", model, "--json"]
    rc, out, _ = run(capsys, "ingest", str(path), *base)
    assert rc == 0 and json.loads(out)["written"] == 5
    rc, out, _ = run(capsys, "ingest", str(path), *base)
    summary = json.loads(out)
    assert rc == 0 and summary["written"] == 0 and summary["skipped"] == 5 and summary["count"] == 5


def test_malformed_line_names_file_and_line(capsys, tmp_path, model):
    path = tmp_path / "bad.jsonl"
    docs = sample_corpus()[:4]
    lines = [json.dumps(d) for d in docs]
    lines.insert(2, '{"id": "broken", "text": ')  # line 3
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    uri = f"qdrant://{tmp_path}/q"
    base = ["--uri", uri, "--collection", "b", "--model", model]
    rc, out, err = run(capsys, "ingest", str(path), *base)
    assert rc == 1
    line = one_error_line(err)
    assert "bad.jsonl" in line and "line 3" in line and "malformed JSON" in line

    rc, out, err = run(capsys, "ingest", str(path), *base, "--skip-bad-lines")
    assert rc == 0, err
    assert "4 read" in out and "1 bad lines skipped" in out and "line 3" in out


def test_milvus_lite(capsys, tmp_path, model, sample_jsonl):
    if importlib.util.find_spec("m3connect.adapters.milvus") is None or importlib.util.find_spec("pymilvus") is None:
        pytest.skip("Milvus adapter or pymilvus not available")
    uri = f"milvus://{tmp_path}/m.db"
    base = ["--uri", uri, "--collection", "docs", "--model", model]
    rc, out, err = run(capsys, "ingest", str(sample_jsonl), *base)
    assert rc == 0, err
    assert "40 written" in out
    rc, out, err = run(capsys, "ingest", str(sample_jsonl), *base)
    assert rc == 0, err
    assert "0 written, 40 skipped" in out
    rc, out, err = run(capsys, "search", "vector database", *base, "--json", "--filter", '{"lang": "de"}')
    assert rc == 0, err
    hits = json.loads(out)["hits"]
    assert hits and all(h["metadata"]["lang"] == "de" for h in hits)
    assert _info(capsys, uri, "docs")["count"] == 40


def test_a_collection_without_colbert(capsys, tmp_path, model, sample_jsonl):
    """``ingest --no-colbert``: searches default to dense + sparse; asking for ColBERT is one line."""
    base = ["--uri", f"qdrant://{tmp_path}/q", "--collection", "docs", "--model", model]
    rc, out, err = run(capsys, "ingest", str(sample_jsonl), *base, "--no-colbert")
    assert rc == 0, err
    rc, out, err = run(capsys, "search", "vector database", *base, "--json", "-k", "3")
    assert rc == 0, err
    result = json.loads(out)
    assert result["weights"] == [0.4, 0.2, 0.0] and len(result["hits"]) == 3
    assert all(set(h["scores"]) == {"dense", "sparse"} for h in result["hits"])
    assert _info(capsys, f"qdrant://{tmp_path}/q", "docs")["spec"]["store_colbert"] is False
    rc, out, err = run(capsys, "search", "vector database", *base, "--weights", "0.4,0.2,0.4")
    assert rc != 0 and "store_colbert=False" in err and len(err.strip().splitlines()) == 1
    rc, out, err = run(capsys, "search", "vector database", *base, "--reencode-colbert", "--json", "-k", "3")
    assert rc == 0, err
    result = json.loads(out)
    assert result["weights"] == [0.4, 0.2, 0.4]
    assert all(set(h["scores"]) == {"dense", "sparse", "colbert"} for h in result["hits"])


def test_model_default_comes_from_env(capsys, tmp_path, model, sample_jsonl, monkeypatch):
    monkeypatch.setenv("M3_MODEL", model)
    uri = f"qdrant://{tmp_path}/q"
    rc, out, err = run(capsys, "ingest", str(sample_jsonl), "--uri", uri, "--collection", "e")
    assert rc == 0, err
    assert "40 written" in out


# -- errors -----------------------------------------------------------------------------------


def test_error_cases_are_one_line(capsys, tmp_path, model, sample_jsonl, monkeypatch):
    uri = f"qdrant://{tmp_path}/q"
    cases = [
        (["ingest", str(tmp_path / "missing.jsonl"), "--uri", uri, "--model", model], 1, "missing.jsonl"),
        (["search", "x", "--uri", "foo://bar", "--model", model], 2, "unknown URI scheme"),
        (["search", "x", "--uri", "qdrant://127.0.0.1:1", "--model", model], 1, "cannot reach Qdrant"),
        (["search", "x", "--uri", uri, "--model", model, "--weights", "1,2"], 2, "--weights"),
        (["search", "x", "--uri", uri, "--model", model, "--weights", "0,0,0"], 2, "zero"),
        (["search", "x", "--uri", uri, "--model", model, "--filter", "{lang: en}"], 2, "--filter"),
        (["search", "x", "--uri", uri, "--model", model, "--filter", '{"lang": {"$regex": "e"}}'], 2, "--filter"),
        (["search", "x", "--model", model], 2, "--uri"),
        (["bogus"], 2, "invalid choice"),
        (["info", "--uri", uri, "--collection", "nothing_here"], 1, "does not exist"),
        (["ingest", str(sample_jsonl), "--uri", uri, "--model", str(tmp_path / "no-model")], 1, "no-model"),
    ]
    for argv, code, needle in cases:
        rc, out, err = run(capsys, *argv)
        assert rc == code, (argv, rc, err)
        assert needle in one_error_line(err), (argv, err)


def test_unreachable_hub_says_how_to_use_a_local_copy(capsys, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    rc, out, err = run(capsys, "search", "x", "--uri", f"qdrant://{tmp_path}/q", "--model", "BAAI/bge-m3")
    assert rc == 1
    line = one_error_line(err)
    assert "BAAI/bge-m3" in line and "local" in line and "--model" in line and "M3_MODEL" in line


def test_debug_shows_the_traceback(tmp_path, model):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "ingest", str(tmp_path / "nope.jsonl"), "--uri", f"qdrant://{tmp_path}/q", "--model", model])


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "m3connect.cli", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("ingest", "search", "info", "eval"):
        assert command in proc.stdout


# -- eval -------------------------------------------------------------------------------------


@pytest.fixture
def beir_dir(tmp_path: Path) -> Path:
    """A tiny BEIR dataset: queries are the first words of a doc, judged relevant to it."""
    root = tmp_path / "tinybeir"
    (root / "qrels").mkdir(parents=True)
    docs = sample_corpus()
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"_id": d["id"], "title": "", "text": d["text"]}, ensure_ascii=False) + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as fh:
        for i, d in enumerate(docs[:30]):
            fh.write(json.dumps({"_id": f"q{i}", "text": " ".join(d["text"].split()[:4])}, ensure_ascii=False) + "\n")
    for split, rng in (("test", range(0, 20)), ("dev", range(20, 30))):
        with open(root / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as fh:
            fh.write("query-id\tcorpus-id\tscore\n")
            for i in rng:
                fh.write(f"q{i}\t{docs[i]['id']}\t1\n")
    return root


def test_eval_routes_tune_and_plot(capsys, tmp_path, model, beir_dir):
    png = tmp_path / "out" / "quality.png"
    rc, out, err = run(capsys, "eval", str(beir_dir), "--model", model, "--tune", "--tune-step", "0.25",
                       "--plot", str(png), "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert data["documents"] == 40 and data["queries"] == 20
    assert list(data["routes"]) == ["dense", "sparse", "colbert", "dense+sparse", "all"]
    assert data["routes"]["all"]["weights"] == [1.0, 0.3, 1.0]
    for r in data["routes"].values():
        assert 0.0 <= r["ndcg@10"] <= 1.0 and 0.0 <= r["recall@100"] <= 1.0
    assert data["routes"]["dense"]["recall@100"] == pytest.approx(1.0)  # 40 docs: all in the top 100
    tuned = data["tuned"]
    assert len(tuned["weights"]) == 3 and sum(tuned["weights"]) > 0
    assert tuned["tune_queries"] == 10 and tuned["test_queries"] == 10
    assert 0.0 <= tuned["test"]["ndcg@10"] <= 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_table_with_dev_split(capsys, model, beir_dir):
    rc, out, err = run(capsys, "eval", str(beir_dir), "--model", model, "--uri", "qdrant://:memory:",
                       "--tune", "--tune-split", "dev", "--tune-step", "0.5")
    assert rc == 0, err
    assert "nDCG@10" in out and "Recall@100" in out
    for route in ("dense", "sparse", "colbert", "dense+sparse", "all"):
        assert any(line.split()[:1] == [route] for line in out.splitlines()), route
    assert "tuned weights" in out and "10 queries of dev" in out


def test_eval_missing_qrels_is_one_line(capsys, model, beir_dir):
    rc, out, err = run(capsys, "eval", str(beir_dir), "--model", model, "--split", "train")
    assert rc == 1
    assert "train.tsv" in one_error_line(err)


# -- metrics (hand-computed) ------------------------------------------------------------------


def test_ndcg_hand_computed():
    qrels = {"a": 2, "b": 1, "c": 0}
    # ranked b, x, a: DCG = 1/log2(2) + 0 + 2/log2(4) = 2; IDCG = 2/1 + 1/log2(3)
    expected = 2.0 / (2.0 + 1.0 / math.log2(3))
    assert ev.ndcg_at_k(["b", "x", "a"], qrels, 3) == pytest.approx(expected)
    assert ev.ndcg_at_k(["b", "x", "a"], qrels, 1) == pytest.approx(1.0 / 2.0)
    assert ev.ndcg_at_k(["a", "b"], qrels, 10) == pytest.approx(1.0)
    assert ev.ndcg_at_k(["x", "y"], qrels, 10) == 0.0
    assert ev.ndcg_at_k(["a"], {"a": 0}, 10) == 0.0  # nothing relevant
    assert ev.ndcg_at_k(["b", "b", "a"], qrels, 3) == pytest.approx(2.0 / (2.0 + 1.0 / math.log2(3)))
    assert ev.ndcg_at_k(["x", "a"], {"a": 1}, 10) == pytest.approx(1 / math.log2(3))
    with pytest.raises(ValueError):
        ev.ndcg_at_k(["a"], qrels, 0)


def test_recall_hand_computed():
    qrels = {"a": 1, "b": 1, "c": 1, "z": 0}
    assert ev.recall_at_k(["a", "z", "b"], qrels, 2) == pytest.approx(1 / 3)
    assert ev.recall_at_k(["a", "z", "b"], qrels, 3) == pytest.approx(2 / 3)
    assert ev.recall_at_k(["a", "b", "c"], qrels, 100) == 1.0
    assert ev.recall_at_k(["a"], {}, 10) == 0.0


def test_mean_metrics_skips_unjudged_queries():
    run_ = {"q1": ["a", "b"], "q2": ["x"], "q3": ["c"]}
    qrels = {"q1": {"a": 1}, "q2": {"y": 1}, "q3": {"c": 0}}
    m = ev.mean_metrics(run_, qrels, ndcg_k=10, recall_k=100)
    assert m["queries"] == 2
    assert m["ndcg@10"] == pytest.approx(0.5) and m["recall@100"] == pytest.approx(0.5)


def test_weight_grid_and_split():
    grid = ev.weight_grid(0.5)
    assert (0.0, 0.0, 0.0) not in grid
    assert (1.0, 0.0, 0.0) in grid and (0.5, 0.0, 0.0) not in grid  # same ranking as (1, 0, 0)
    assert len(grid) == len({tuple(round(x / sum(w), 6) for x in w) for w in grid})
    tune, test = ev.split_queries([f"q{i}" for i in range(11)], seed=3)
    assert len(tune) == 5 and len(test) == 6 and not set(tune) & set(test)
    assert ev.split_queries([f"q{i}" for i in range(11)], seed=3) == (tune, test)


def test_tune_weights_picks_the_route_that_ranks_right():
    # sparse puts the relevant doc first; dense puts it last.
    cands = {"q": [("rel", {"dense": 0.1, "sparse": 0.9, "colbert": 0.5}),
                   ("other", {"dense": 0.9, "sparse": 0.1, "colbert": 0.5})]}
    qrels = {"q": {"rel": 1}}
    best, score = ev.tune_weights(cands, qrels, [(1, 0, 0), (0, 1, 0), (0, 0, 1)], k=10)
    assert best == (0.0, 1.0, 0.0) and score == pytest.approx(1.0)


def test_beir_loaders(tmp_path):
    (tmp_path / "q.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\nq2\td3\t0\n")
    assert ev.load_qrels(tmp_path / "q.tsv") == {"q1": {"d1": 1.0, "d2": 2.0}, "q2": {"d3": 0.0}}
    (tmp_path / "c.jsonl").write_text('{"_id": "d1", "title": "T", "text": "body"}\n\n{"_id": 2, "text": "x"}\n')
    assert list(ev.iter_corpus(tmp_path / "c.jsonl")) == [
        {"id": "d1", "text": "T body", "metadata": {"title": "T"}},
        {"id": "2", "text": "x", "metadata": {}},
    ]
    (tmp_path / "bad.jsonl").write_text('{"_id": "d1", "text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(ev.iter_corpus(tmp_path / "bad.jsonl"))
