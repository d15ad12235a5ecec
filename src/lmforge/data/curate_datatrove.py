"""The curate stage's `engine: datatrove` path: the same rules as data/curate.py, as datatrove jobs.

    1 prep     (one task per input file)  read ─> normalise ─> quality ─> exact-dedup signatures
    2 exact    (one task)                 datatrove ExactFindDedups over the sorted signature files
    3 sign     (one task per input file)  datatrove ExactDedupFilter ─> MinhashDedupSignature (to disk)
    4 buckets  (one task per LSH band)    datatrove MinhashDedupBuckets: duplicate pairs per band
    5 cluster  (one task)                 datatrove MinhashDedupCluster: pairs ─> clusters, one kept
    6 final    (one task per input file)  datatrove MinhashDedupFilter ─> hash split ─> PII ─> parts
    then: the parts are copied, in input order, into the same `<split>-NNNNN.parquet` shards and
    the same curation report as `engine: local` writes.

Why datatrove: it is what the field runs this exact job on (FineWeb), its MinHash dedup keeps
signatures on disk in sorted per-band files (memory per task is one shard's documents, not the
corpus), its executors (local processes, Slurm, Ray) share one pipeline definition, and each
task leaves a completion marker so a killed run restarts only unfinished tasks.

Where datatrove's rule differs from the local one (see README "Curation at scale"):
- Near dedup: datatrove declares a pair duplicate when any LSH band collides (no check of the
  estimated Jaccard against the threshold) and removes all but one of each *transitive*
  cluster; the local path checks each candidate against `threshold` and compares only with
  kept documents. Shingles, band count and rows per band are lmforge's (same `ngram`,
  `num_perm`, `seed`, `lsh_weights`); the permutations are datatrove's 61-bit ones.
- Leakage: every near-duplicate cluster keeps one document, so no near-duplicate pair survives
  across splits; the check needs near dedup on with `leakage.threshold` >= its threshold.
- Quality: lmforge's Gopher-style rules run as a datatrove step (datatrove's GopherQualityFilter
  tokenises words differently and has other options), so one config means one set of rules.
"""

from __future__ import annotations

import gzip
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from lmforge.data import curate
from lmforge.data.formats import ReadStats, iter_text_records, resolve_inputs
from lmforge.errors import LmforgeError
from lmforge.rundir import RunDir, atomic_write_json, staged_dir

MAX_TASKS = 65534  # exact dedup keeps the highest priority; priority 65535 - rank must stay >= 1


def lsh_bands(nd: curate.NearDedupConfig) -> tuple[int, int]:
    """(bands, rows per band) the local path's LSH index chooses for these settings."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=nd.threshold, num_perm=nd.num_perm, weights=nd.lsh_weights)
    return lsh.b, lsh.r


def check_config(cfg: curate.Config) -> None:
    """One sentence for the settings this engine cannot honour."""
    leak_t = cfg.leakage.threshold or cfg.near_dedup.threshold
    if cfg.leakage.enabled and not cfg.near_dedup.enabled:
        raise LmforgeError("engine: datatrove checks leakage through near dedup's clusters; enable near_dedup "
                           "or set leakage.enabled: false.")
    if cfg.leakage.enabled and leak_t < cfg.near_dedup.threshold:
        raise LmforgeError(f"engine: datatrove cannot check leakage below near_dedup.threshold "
                           f"({leak_t:g} < {cfg.near_dedup.threshold:g}); raise leakage.threshold or use engine: local.")


# --------------------------------------------------------------------------------------------
# Steps that run lmforge's rules inside datatrove tasks


class Prep(PipelineStep):
    """Read this task's input file; normalise; apply the quality rules; yield survivors.

    Counts and examples of what it removed go to `<work>/counts/prep-<rank>.json`.
    """

    name = "lmforge prep"

    def __init__(self, cfg: curate.Config, files: list[str], work: str):
        super().__init__()
        self.cfg, self.files, self.work = cfg, files, work

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        cfg, stats = self.cfg, ReadStats()
        removed: Counter = Counter()
        examples: dict[str, list[dict]] = {}
        n_in = 0
        records = iter_text_records([self.files[rank]], text_field=cfg.text_field, text_mode=cfg.text_mode,
                                    dataset_split=cfg.dataset_split, on_bad_rows=cfg.on_bad_rows, stats=stats)
        for text, rec in records:
            n_in += 1
            if cfg.normalize.enabled:
                text = curate.normalize_text(text, cfg.normalize)
            fail = ("empty", "no text after normalisation") if not text.strip() else (
                curate.quality_failure(text, cfg.quality) if cfg.quality.enabled else None)
            if fail:
                removed[fail[0]] += 1
                exs = examples.setdefault(fail[0], [])
                if len(exs) < cfg.examples:
                    exs.append({"where": rec.where, "detail": fail[1], "text": curate.clip(text, cfg.example_chars)})
                continue
            h = curate.key_hash(curate.dedup_key(text))
            self.stat_update("forwarded")
            yield Document(text=text, id=f"{rank}/{n_in}", metadata={"hash": h, "where": rec.where})
        atomic_write_json(Path(self.work) / "counts" / f"prep-{rank:05d}.json",
                          {"documents_in": n_in, "removed": removed, "examples": examples, "read": stats.as_dict()})


def exact_content(doc: Document) -> bytes:
    """What exact dedup compares: the 64-bit hash of lmforge's dedup key (as the local path)."""
    return doc.metadata["hash"].to_bytes(8, "little")


def exact_priority(doc: Document) -> int:
    """Earlier input files win, as in the local path (within a file, the earlier document wins)."""
    return MAX_TASKS + 1 - int(doc.id.split("/")[0])


class KeyWords(WordTokenizer):
    """Words of lmforge's dedup key (whitespace-split): stands in for datatrove's language tokenizers,
    which need spaCy and are not used because `Signature` shingles the dedup key itself."""

    def word_tokenize(self, text: str) -> list[str]:
        return curate.dedup_key(text).split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


class Signature(MinhashDedupSignature):
    """datatrove's on-disk MinHash signatures over lmforge's shingles (word n-grams of the dedup key)."""

    def __init__(self, output_folder: str, config: MinhashConfig, nd: curate.NearDedupConfig):
        super().__init__(output_folder, config, language=KeyWords())
        self.hasher = curate.MinHasher(nd.num_perm, nd.ngram, nd.seed)

    def get_shingles(self, text: str) -> np.ndarray:
        return self.hasher.shingle_hashes(curate.dedup_key(text)).astype(np.uint64).reshape(-1, 1)


class Finalize(PipelineStep):
    """Hash split and PII scrub; write this task's part of each split to `<work>/parts/<split>/<rank>.parquet`."""

    name = "lmforge split"

    def __init__(self, cfg: curate.Config, work: str):
        super().__init__()
        self.cfg, self.work = cfg, work

    def run(self, data, rank: int = 0, world_size: int = 1):
        parts: dict[str, list[str]] = {}
        pii: Counter = Counter()
        for doc in data:
            text = doc.text
            if self.cfg.pii.enabled:
                text, counts = curate.scrub_pii(text, self.cfg.pii)
                pii.update(counts)
                pii["documents_changed"] += any(counts.values())
            parts.setdefault(curate.split_of(doc.metadata["hash"], self.cfg.splits), []).append(text)
        for split, texts in parts.items():
            folder = Path(self.work) / "parts" / split
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"text": texts}), folder / f"{rank:05d}.parquet")  # a rerun overwrites it
        atomic_write_json(Path(self.work) / "counts" / f"final-{rank:05d}.json", {"pii": pii})
        yield from ()


class ShardReader(PipelineStep):
    """The documents one earlier task of this job wrote to `<folder>/<rank>.jsonl.gz` (none if it wrote none)."""

    name = "lmforge shard reader"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        path = Path(self.folder) / f"{rank:05d}.jsonl.gz"
        if path.exists():
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    yield Document(text=row["text"], id=row["id"], metadata=row.get("metadata", {}))


# --------------------------------------------------------------------------------------------
# The jobs


def _run_job(name: str, pipeline: list, tasks: int, workers: int, work: Path) -> None:
    job = LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks),
                                logging_dir=str(work / "logs" / name), skip_completed=True)
    try:
        job.run()
    except LmforgeError:
        raise  # bad input, named by the rule that found it
    except Exception as e:  # a task failed: completed tasks keep their markers, a rerun resumes the rest
        raise LmforgeError(f"curate (engine: datatrove): job {name} failed ({type(e).__name__}: {e}); the tasks "
                           f"it completed are kept, rerun with --resume to resume; logs in {work / 'logs' / name}.") from None
    if failed := job.get_incomplete_ranks(skip_completed=True):
        raise LmforgeError(f"curate (engine: datatrove): job {name} left tasks {failed[:5]} unfinished; rerun with "
                           f"--resume to run them; logs in {work / 'logs' / name}.")


def run_jobs(cfg: curate.Config, files: list[str], work: Path) -> None:
    """The datatrove jobs; each skips the tasks an earlier (killed) run completed."""
    t, w = len(files), cfg.workers
    exact = ExactDedupConfig(content_getter=exact_content, document_priority=exact_priority,
                             hash_config=HashConfig(precision=64))
    bands, rows = lsh_bands(cfg.near_dedup)
    mh = MinhashConfig(n_grams=cfg.near_dedup.ngram, num_buckets=bands, hashes_per_bucket=rows,
                       seed=cfg.near_dedup.seed)
    d = {k: str(work / k) for k in ("prep", "exact_sigs", "exact_dups", "sign", "mh_sigs", "mh_buckets",
                                    "mh_remove", "excluded/exact_duplicate", "excluded/near_duplicate")}
    writer = dict(output_filename="${rank}.jsonl.gz", compression="gzip")
    prep = [Prep(cfg, files, str(work)), JsonlWriter(d["prep"], **writer)]
    if cfg.exact_dedup.enabled:
        prep.append(ExactDedupSignature(d["exact_sigs"], exact))
    _run_job("1-prep", prep, t, w, work)
    sign: list = [ShardReader(d["prep"])]
    if cfg.exact_dedup.enabled:
        _run_job("2-exact", [ExactFindDedups(d["exact_sigs"], d["exact_dups"], exact)], 1, 1, work)
        sign.append(ExactDedupFilter(d["exact_dups"], exact,
                                     exclusion_writer=JsonlWriter(d["excluded/exact_duplicate"], **writer)))
    sign.append(JsonlWriter(d["sign"], **writer))
    if cfg.near_dedup.enabled:
        sign.append(Signature(d["mh_sigs"], mh, cfg.near_dedup))
    _run_job("3-sign", sign, t, w, work)
    final: list = [ShardReader(d["sign"])]
    if cfg.near_dedup.enabled:
        _run_job("4-buckets", [MinhashDedupBuckets(input_folder=d["mh_sigs"], output_folder=d["mh_buckets"], config=mh)], bands, w, work)
        _run_job("5-cluster", [MinhashDedupCluster(input_folder=d["mh_buckets"], output_folder=d["mh_remove"], config=mh)], 1, 1, work)
        final.append(MinhashDedupFilter(d["mh_remove"],
                                        exclusion_writer=JsonlWriter(d["excluded/near_duplicate"], **writer)))
    _run_job("6-final", [*final, Finalize(cfg, str(work))], t, w, work)


# --------------------------------------------------------------------------------------------
# The stage


def run(cfg: curate.Config, rd: RunDir, resume: bool = False) -> dict:
    """Curate `cfg.inputs` into `rd.artifact` with datatrove; `resume` (after a kill) runs only the tasks
    without a completion marker in `rd.checkpoints/datatrove`."""
    t0 = time.time()
    check_config(cfg)
    files = [str(p) for p in resolve_inputs(cfg.inputs)]
    if len(files) > MAX_TASKS:
        raise LmforgeError(f"engine: datatrove takes at most {MAX_TASKS} input files, got {len(files)}; "
                           "concatenate some.")
    # The pipeline passes `resume` only when config and inputs are unchanged (its input hash), so
    # the completion markers and signatures here always belong to this configuration.
    work = rd.checkpoints / "datatrove"
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    (work / "counts").mkdir(parents=True, exist_ok=True)
    run_jobs(cfg, files, work)
    with staged_dir(rd.artifact) as out:
        result = _assemble(cfg, rd, work, out, len(files), t0)
    shutil.rmtree(work, ignore_errors=True)  # signatures can be large; the shards are written
    return result


def _excluded(work: Path, rule: str, tasks: int, cfg: curate.Config, detail: str) -> tuple[int, list[dict]]:
    """How many documents a datatrove dedup filter excluded, and the first few as report examples."""
    n, examples = 0, []
    for rank in range(tasks):
        path = work / "excluded" / rule / f"{rank:05d}.jsonl.gz"
        if not path.exists():
            continue
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                n += 1
                if len(examples) < cfg.examples:
                    row = json.loads(line)
                    examples.append({"where": row["metadata"]["where"], "detail": detail,
                                     "text": curate.clip(row["text"], cfg.example_chars)})
    return n, examples


def _assemble(cfg: curate.Config, rd: RunDir, work: Path, out: Path, tasks: int, t0: float) -> dict:
    removed: Counter = Counter()
    examples: dict[str, list[dict]] = {}
    pii: Counter = Counter()
    stats = ReadStats()
    n_in = 0
    for rank in range(tasks):
        prep = json.loads((work / "counts" / f"prep-{rank:05d}.json").read_text())
        n_in += prep["documents_in"]
        removed.update(prep["removed"])
        for rule, exs in prep["examples"].items():
            examples.setdefault(rule, []).extend(exs)
        r = prep["read"]
        stats.files += r["files"]
        stats.records += r["records"]
        stats.skipped = dict(Counter(stats.skipped) + Counter(r["skipped"]))
        stats.examples += r["skipped_examples"]
        pii.update(json.loads((work / "counts" / f"final-{rank:05d}.json").read_text())["pii"])
    for rule, detail in (("exact_duplicate", "same normalised text as an earlier document"),
                         ("near_duplicate", "in a MinHash cluster (datatrove) with an earlier kept document")):
        n, exs = _excluded(work, rule, tasks, cfg, detail)
        if n:
            removed[rule], examples[rule] = n, exs
    examples = {rule: exs[:cfg.examples] for rule, exs in examples.items()}
    writers = {s: curate.ShardWriter(out, s, cfg.shard_mb * 1e6) for s in curate.SPLITS if getattr(cfg.splits, s) > 0}
    for split, writer in writers.items():
        for rank in range(tasks):
            part = work / "parts" / split / f"{rank:05d}.parquet"
            if part.exists():
                for b in pq.ParquetFile(part).iter_batches(batch_size=4096, columns=["text"]):
                    for text in b.column("text").to_pylist():
                        writer.add(text)
    return curate.finish(cfg, rd, out, n_in=n_in, removed=removed, examples=examples, pii_counts=pii,
                         stats=stats, writers=writers, t0=t0)
