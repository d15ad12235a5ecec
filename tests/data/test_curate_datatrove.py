"""curate with engine: datatrove keeps what engine: local keeps, in the same report and shard format."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest
import yaml

from lmforge.data import curate_datatrove as cdt
from lmforge.data.curate import Config, DocIndex, MinHasher, dedup_key
from lmforge.data.curate_datatrove import check_config, lsh_bands
from lmforge.errors import LmforgeError
from lmforge.pipeline import run_single

MARGIN = 0.1  # a pair the engines may decide differently: estimated Jaccard within this of the threshold


def words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 8))) for _ in range(n)]


def corpus(seed: int = 0) -> list[list[str]]:
    """Three files of clean documents with planted exact copies (also across files), near copies
    (1-2 words of 80 replaced: Jaccard ~0.8-0.9), far copies (20 of 80 replaced) and junk."""
    rng = random.Random(seed)
    files: list[list[str]] = [[], [], []]
    originals: list[str] = []
    for i in range(150):
        f = files[i % 3]
        r = rng.random()
        if originals and r < 0.12:
            src = rng.choice(originals)
            f.append("  " + src.upper() + " !")  # same dedup key
        elif originals and r < 0.30:
            w = rng.choice(originals).split()
            for j in rng.sample(range(len(w)), rng.choice((1, 2, 20))):
                w[j] = "qq" + w[j]
            f.append(" ".join(w))
        elif r < 0.35:
            f.append("buy buy buy buy buy buy buy buy buy buy")  # fails the repeated n-gram rules
        else:
            doc = " ".join(words(rng, 80)) + "."
            originals.append(doc)
            f.append(doc)
    return files


def run_engine(tmp_path, files: list[list[str]], engine: str, resume: bool = False, **extra) -> tuple[dict, dict[str, list[str]]]:
    inputs = []
    for i, docs in enumerate(files):
        p = tmp_path / "in" / f"part{i}.jsonl"
        p.parent.mkdir(exist_ok=True)
        p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        inputs.append(str(p))
    cfg = {"inputs": inputs, "engine": engine, "workers": 2,
           "splits": {"train": 0.8, "validation": 0.1, "test": 0.1}, **extra}
    cfg_path = tmp_path / f"{engine}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run_single("curate", cfg_path, [], out=str(tmp_path / engine), force=not resume, resume=resume, echo=lambda *a: None)
    data = tmp_path / engine / "data"
    report = json.loads((data / "curation_report.json").read_text())
    out = {s: [t for sh in info["shards"] for t in pq.read_table(data / sh)["text"].to_pylist()]
           for s, info in report["splits"].items()}
    return report, out


def jaccard_est(a: str, b: str, hasher: MinHasher) -> float:
    sa, sb = hasher.signatures([hasher.shingle_hashes(dedup_key(a)), hasher.shingle_hashes(dedup_key(b))])
    return float((sa == sb).mean())


def test_engines_keep_the_same_documents(tmp_path):
    files = corpus()
    rep_l, out_l = run_engine(tmp_path, files, "local")
    rep_d, out_d = run_engine(tmp_path, files, "datatrove")
    # Same report format, same counts for every rule up to near dedup.
    assert rep_d.keys() == rep_l.keys() and rep_d["removed"].keys() == rep_l["removed"].keys()
    assert rep_d["documents_in"] == rep_l["documents_in"] == sum(map(len, files))
    for rule in rep_l["removed"]:
        if rule not in ("near_duplicate", "leak_validation", "leak_test"):
            assert rep_d["removed"][rule]["count"] == rep_l["removed"][rule]["count"], rule
    assert rep_l["removed"]["exact_duplicate"]["count"] > 10 and rep_l["removed"]["near_duplicate"]["count"] > 5
    # Same documents kept, split by split, in input order — except pairs near the threshold.
    hasher = MinHasher(128, 5, 1)
    kept_l = {t for ts in out_l.values() for t in ts}
    kept_d = {t for ts in out_d.values() for t in ts}
    differing = []
    for t in kept_l ^ kept_d:
        best = max(jaccard_est(t, u, hasher) for u in kept_l | kept_d if u != t)
        differing.append(round(best, 2))
        assert abs(best - 0.8) <= MARGIN, f"kept by one engine only, max Jaccard ~{best:.2f}: {t[:60]}"
    print("documents kept by one engine only (their max estimated Jaccard):", differing)
    for split in out_l:
        assert [t for t in out_d[split] if t in kept_l] == [t for t in out_l[split] if t in kept_d]


def test_exact_dedup_identical_and_rerun_resumes(tmp_path, monkeypatch):
    files = corpus(seed=3)
    off = {"near_dedup": {"enabled": False}, "leakage": {"enabled": False}, "workers": 1}  # 1: tasks run in-process
    rep_l, out_l = run_engine(tmp_path, files, "local", **off)
    # A run whose last job dies on task 1 ...
    finalize, prep = cdt.Finalize.run, cdt.Prep.run
    prepped: list[int] = []

    def dies_on_1(self, data, rank=0, world_size=1):
        if rank == 1:
            raise RuntimeError("killed")
        yield from finalize(self, data, rank, world_size)

    def counted(self, data=None, rank=0, world_size=1):
        prepped.append(rank)
        yield from prep(self, data, rank, world_size)

    monkeypatch.setattr(cdt.Prep, "run", counted)
    monkeypatch.setattr(cdt.Finalize, "run", dies_on_1)
    with pytest.raises(LmforgeError, match="job 6-final failed .*rerun with --resume"):
        run_engine(tmp_path, files, "datatrove", **off)
    assert prepped == [0, 1, 2]
    # ... is resumed by the next run: no input is read again, only the unfinished tasks run.
    monkeypatch.setattr(cdt.Finalize, "run", finalize)
    prepped.clear()
    rep_d, out_d = run_engine(tmp_path, files, "datatrove", resume=True, **off)
    assert prepped == []
    assert out_d == out_l  # exact dedup alone: the very same documents, in the same shards and order
    assert rep_d["removed"] == rep_l["removed"] and rep_d["removed"]["exact_duplicate"]["count"] > 10
    assert rep_d["examples"]["exact_duplicate"][0]["where"].startswith(str(tmp_path / "in"))


def test_settings_the_engine_cannot_honour_are_one_sentence():
    with pytest.raises(LmforgeError, match="enable near_dedup"):
        check_config(Config(inputs=["x"], engine="datatrove", near_dedup={"enabled": False}))
    with pytest.raises(LmforgeError, match="below near_dedup.threshold"):
        check_config(Config(inputs=["x"], engine="datatrove", leakage={"threshold": 0.5}))
    nd = Config(inputs=["x"]).near_dedup
    local = DocIndex(MinHasher(nd.num_perm, nd.ngram, nd.seed), nd.threshold, nd.lsh_weights).lsh
    assert lsh_bands(nd) == (local.b, local.r) == (14, 9)  # datasketch's choice for 0.8 / 128 / (0.1, 0.9)
