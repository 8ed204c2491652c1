"""Data-layer benchmarks (issue 11): JSON reading, near-duplicate recall, `data stats` at scale.

1. **Reading**: the same SFT rows as one indented JSON array (the KoChatGPT layout) and as JSON lines, at 12k, 24k
   and 48k rows, through ``read_file`` (parse + records), side by side with the order alternating per repeat;
   medians and the ratio array / lines. Once, at 12k and 24k, the previous array reader (which counted newlines from
   the start of the file for every element; copied below) for reference.
2. **Near duplicates**: the share of pairs of texts at 3-gram Jaccard 0.8 and 0.9 (400 pairs each, Korean answers of
   30-60 eojeol) that MinHash-LSH proposes as candidates (its recall; the exact check then keeps exactly those at
   >= 0.85), and the share of unrelated pairs it proposes (work the exact check must do), for our signatures and the
   previous ones (32 functions with slopes 2k + c, 8 bands of 4; copied below).
3. **`data stats` on 50k rows**: ``python -m rlhf_ablate data stats --source DIR`` as a fresh process (imports
   included, as a user runs it) on 20k SFT rows, 15k ranked groups of 3 answers and 15k PPO prompts (5 % near
   copies planted); median of the repeats.

    python benchmarks/bench_data.py [--repeats 5] [--out FILE] [--quick]

Text is generated here (pseudo-Korean words from Hangul syllables with real particles and endings; English-like
text from a fixed word list), so the numbers measure the code, not a corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

from common import PY, median, snapshot, timed, write_result

PARTICLES = ["은", "는", "이", "가", "을", "를", "에서", "으로", "와", "과", "의", "에게", "도", "만"]
ENDINGS = ["습니다.", "어요.", "나요?", "까요?", "해 주세요.", "입니다.", "지요.", "네요."]
EN = ("the a to and of i you it is that in for be have not on with this do what but can my are your they "
      "about if would like just there so know how think people some good time could one get make want "
      "because help very really more also other when which their should need way work thing will sure "
      "sorry thanks question answer tell explain more here well much many any also find try use feel "
      "person friend family money home school job day night house car food water world life").split()


def korean_vocab(rng: random.Random, n: int = 3000) -> list[str]:
    syll = [chr(0xAC00 + i) for i in range(0, 11172, 7)]
    return ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def korean_text(rng: random.Random, vocab: list[str], words: int) -> str:
    out = []
    for i in range(words):
        w = rng.choice(vocab)
        if rng.random() < 0.5:
            w += rng.choice(PARTICLES)
        if i % 8 == 7 or i == words - 1:
            w += rng.choice(ENDINGS)
        out.append(w)
    return " ".join(out)


def english_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(EN) for _ in range(words)) + "."


# ---------------------------------------------------------------------------------------------------------
# The previous implementations, for reference (rlhf_ablate/data/rows.py and versions.py before issue 11)
# ---------------------------------------------------------------------------------------------------------

def old_array_rows(text: str):
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    ws = re.compile(r"[\s,]*")
    while True:
        pos = ws.match(text, pos).end()
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1  # counted from the start for every element: quadratic
        obj, pos = dec.raw_decode(text, pos)
        yield line, obj


_PRIME = (1 << 61) - 1


def old_signature(sh: set) -> tuple:
    hs = [zlib.crc32(s.encode("utf-8")) for s in sh]
    return tuple(min((((2 * k + 0x9E3779B1) * h + 7919 * k + 1) % _PRIME) for h in hs) for k in range(32))


def old_is_candidate(a: tuple, b: tuple) -> bool:
    return any(a[i:i + 4] == b[i:i + 4] for i in range(0, 32, 4))


# ---------------------------------------------------------------------------------------------------------
# 1. reading
# ---------------------------------------------------------------------------------------------------------

def bench_reading(work: Path, sizes: list[int], repeats: int, old_sizes: list[int]) -> dict:
    from rlhf_ablate.data.readers import read_file
    from rlhf_ablate.data.rows import json_rows

    rng = random.Random(1)
    vocab = korean_vocab(rng)
    out: dict = {}
    for n in sizes:
        rows = [{"prompt": korean_text(rng, vocab, rng.randint(4, 14)),
                 "completion": korean_text(rng, vocab, rng.randint(20, 60)), "tokens": rng.randint(20, 300)}
                for _ in range(n)]
        arr, lines = work / f"sft_{n}.json", work / f"sft_{n}.jsonl"
        arr.write_text(json.dumps(rows, ensure_ascii=False, indent=4), encoding="utf-8")
        lines.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        times: dict = {"array": [], "lines": []}
        for i in range(repeats):
            for v in (["array", "lines"] if i % 2 == 0 else ["lines", "array"]):
                t0 = time.perf_counter()
                got = len(read_file(arr if v == "array" else lines, "sft").records)
                times[v].append(time.perf_counter() - t0)
                assert got == n
        med = {v: median(ts) for v, ts in times.items()}
        out[str(n)] = {"seconds": times, "median": med, "ratio_array_over_lines": med["array"] / med["lines"]}
        if n in old_sizes:  # raw row iteration only, old vs new, once each
            text = arr.read_text(encoding="utf-8")
            t0 = time.perf_counter()
            assert sum(1 for _ in old_array_rows(text)) == n
            t_old = time.perf_counter() - t0
            t0 = time.perf_counter()
            assert sum(1 for _ in json_rows(arr)) == n
            out[str(n)]["raw_rows_previous_reader_seconds"] = t_old
            out[str(n)]["raw_rows_this_reader_seconds"] = time.perf_counter() - t0
        print(f"read {n} rows: array {med['array']:.2f}s, lines {med['lines']:.2f}s, ratio "
              f"{out[str(n)]['ratio_array_over_lines']:.2f}"
              + (f"; previous array reader {out[str(n)]['raw_rows_previous_reader_seconds']:.1f}s"
                 if n in old_sizes else ""), flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------
# 2. near-duplicate recall
# ---------------------------------------------------------------------------------------------------------

def _edited(text: str, k: int, rng: random.Random) -> str:
    chars = list(text)
    for _ in range(k):
        i = rng.randrange(len(chars))
        if chars[i] != " ":
            chars[i] = chr(0xAC00 + rng.randrange(11172))
    return "".join(chars)


def pairs_at(target: float, n: int, rng: random.Random, vocab: list[str]) -> list[tuple[str, str, float]]:
    from rlhf_ablate.data.dedup import jaccard, shingles

    out = []
    while len(out) < n:
        a = korean_text(rng, vocab, rng.randint(30, 60))
        sa = shingles(a)
        k = max(1, round((1 - target) * len(sa) / 5))  # ~one edit per 5 shingles lost, then filtered
        b = _edited(a, rng.randint(max(1, k // 2), 2 * k), rng)
        j = jaccard(sa, shingles(b))
        if abs(j - target) <= 0.02:
            out.append((a, b, j))
    return out


def bench_recall(n_pairs: int, n_unrelated: int) -> dict:
    import numpy as np

    from rlhf_ablate.data import dedup

    rng = random.Random(2)
    vocab = korean_vocab(rng)
    res: dict = {"scheme": {"this": f"{dedup.NUM_PERM} independent multiply-shift functions, {dedup.BANDS} bands "
                                    f"x {dedup.ROWS} rows", "previous": "32 functions with slopes 2k + c, 8 bands x 4"}}
    for target in (0.8, 0.85, 0.9):
        ps = pairs_at(target, n_pairs, rng, vocab)
        texts = [t for a, b, _ in ps for t in (a, b)]
        keys = dedup.band_keys(dedup.signatures(texts))
        new = sum(bool(np.any(keys[2 * i] == keys[2 * i + 1])) for i in range(len(ps)))
        old = sum(old_is_candidate(old_signature(dedup.shingles(a)), old_signature(dedup.shingles(b)))
                  for a, b, _ in ps)
        theory = 1 - (1 - target ** dedup.ROWS) ** dedup.BANDS
        res[f"jaccard_{target}"] = {"pairs": len(ps), "mean_jaccard": sum(j for *_, j in ps) / len(ps),
                                    "recall_this": new / len(ps), "recall_previous": old / len(ps),
                                    "recall_this_theory": theory}
        print(f"J={target}: recall {new}/{len(ps)} (theory {theory:.4f}); previous {old}/{len(ps)}", flush=True)
    for lang in ("korean", "english"):
        texts = ([korean_text(rng, vocab, rng.randint(30, 60)) for _ in range(n_unrelated)] if lang == "korean"
                 else [english_text(rng, rng.randint(80, 200)) for _ in range(n_unrelated)])
        t0 = time.perf_counter()
        rate = dedup.candidate_rate(texts)
        t_new = time.perf_counter() - t0
        sigs = [old_signature(dedup.shingles(t)) for t in texts]
        buckets: dict = {}
        for i, s in enumerate(sigs):
            for b in range(8):
                buckets.setdefault((b, s[4 * b:4 * b + 4]), []).append(i)
        old_pairs = {(x, y) for m in buckets.values() for ai, x in enumerate(m) for y in m[ai + 1:]}
        sample = [(rng.randrange(len(texts)), rng.randrange(len(texts))) for _ in range(2000)]
        jac = sorted(dedup.jaccard(dedup.shingles(texts[a]), dedup.shingles(texts[b])) for a, b in sample if a != b)
        total = len(texts) * (len(texts) - 1) / 2
        res[f"unrelated_{lang}"] = {"texts": len(texts), "median_jaccard": jac[len(jac) // 2],
                                    "p99_jaccard": jac[int(0.99 * len(jac))],
                                    "candidate_rate_this": rate, "candidate_rate_previous": len(old_pairs) / total,
                                    "seconds_this": t_new}
        print(f"unrelated {lang}: candidate pairs {rate:.5f} (previous {len(old_pairs) / total:.5f}), median "
              f"Jaccard {jac[len(jac) // 2]:.3f}", flush=True)
    return res


# ---------------------------------------------------------------------------------------------------------
# 3. data stats on 50k rows
# ---------------------------------------------------------------------------------------------------------

def write_50k(d: Path, n_sft: int = 20000, n_rm: int = 15000, n_ppo: int = 15000) -> int:
    rng = random.Random(3)
    vocab = korean_vocab(rng)
    d.mkdir(parents=True, exist_ok=True)

    def maybe_copy(rows: list, make) -> None:
        """One more row: a near copy of an earlier one (5 %) or a new one."""
        if rows and rng.random() < 0.05:
            src = rng.choice(rows)
            rows.append({k: (_edited(v, 2, rng) if isinstance(v, str) and len(v) > 20 else v) for k, v in src.items()})
        else:
            rows.append(make())

    sft: list = []
    while len(sft) < n_sft:
        maybe_copy(sft, lambda: {"prompt": korean_text(rng, vocab, rng.randint(4, 14)),
                                 "completion": korean_text(rng, vocab, rng.randint(20, 80))})
    rm: list = []
    while len(rm) < n_rm:
        maybe_copy(rm, lambda: {"prompt": korean_text(rng, vocab, rng.randint(4, 14)),
                                **{f"completion_{i}": korean_text(rng, vocab, rng.randint(10, 60)) for i in range(3)},
                                "ranking": rng.sample(range(3), 3)})
    ppo: list = []
    while len(ppo) < n_ppo:
        maybe_copy(ppo, lambda: {"prompt": korean_text(rng, vocab, rng.randint(2, 20))})
    for name, rows in (("sft", sft), ("rm", rm), ("ppo", ppo)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                         encoding="utf-8")
    return len(sft) + len(rm) + len(ppo)


def bench_stats(work: Path, repeats: int, quick: bool) -> dict:
    """Wall seconds, and the CPU seconds (user + sys) of the process: on a machine shared with other jobs the wall
    time is inflated by waiting for a core, the CPU time much less so."""
    import resource

    d = work / "data50k"
    rows = write_50k(d, *((2000, 1500, 1500) if quick else ()))
    runs: dict = {"v1": [], "v2": []}
    cpu: dict = {"v1": [], "v2": []}
    load: list = []  # 1-minute load average before each run (2 cores: above 2, runs wait for a core)
    for i in range(repeats):
        for v in (["v1", "v2"] if i % 2 == 0 else ["v2", "v1"]):
            load.append(os.getloadavg()[0])
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            runs[v].append(timed([PY, "-m", "rlhf_ablate", "data", "stats", "--source", str(d), "--version", v],
                                 work, work / f"stats-{v}-{i}.log"))
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[v].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
            print(f"data stats {v} on {rows} rows: {runs[v][-1]:.1f}s wall, {cpu[v][-1]:.1f}s CPU", flush=True)
    return {"rows": rows, "seconds": runs, "cpu_seconds": cpu, "load_average_before": load,
            "median": {v: median(ts) for v, ts in runs.items()}, "median_cpu": {v: median(ts) for v, ts in cpu.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="small sizes, to check that the script runs")
    ap.add_argument("--only", choices=["stats"], default=None,
                    help="rerun only the data stats part and update it in the existing results file")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_data-"))
    src = snapshot(work)
    sys.path.insert(0, str(src))
    try:
        if args.only == "stats":
            path = args.out or Path(__file__).resolve().parent / "results" / "data.json"
            record = json.loads(path.read_text())
            record.pop("benchmark", None)
            record["machine_of_reading_and_recall"] = record.pop("machine", record.get("machine_of_reading_and_recall"))
            record["data_stats"] = bench_stats(work, min(args.repeats, 3), args.quick)
            print(f"written {write_result('data', record, path)}")
            return
        sizes = [1200, 2400] if args.quick else [12000, 24000, 48000]
        record = {
            "what": "JSON array vs JSON lines reading; MinHash-LSH recall and candidate rate; data stats on 50k rows",
            "repeats": args.repeats,
            "reading": bench_reading(work, sizes, args.repeats, sizes[:2]),
            "near_duplicates": bench_recall(100 if args.quick else 400, 300 if args.quick else 2000),
            "data_stats": bench_stats(work, min(args.repeats, 3), args.quick),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = write_result("data" if not args.quick else "data_quick", record,
                        args.out or (work.parent / "bench_data_quick.json" if args.quick else None))
    print(f"written {path}")


if __name__ == "__main__":
    main()
