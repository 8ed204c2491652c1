"""EDA numbers of a data version: what `rlhf_ablate data stats` prints.

The length-by-rank table is the point: our users' reward models learned "longer is better" from data whose
rank-1 answers were the longest, so we say plainly whether that is true of the data about to be trained on.
"""

from __future__ import annotations

import statistics
from collections import Counter

from . import DataBundle
from .records import RankedGroup, SFTExample
from .dedup import near_duplicates
from .versions import dedup_text, n_tokens


def _pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: every value is one that occurs)."""
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))]


def length_summary(texts: list[str]) -> dict:
    if not texts:
        return {"n": 0}
    chars = [len(t) for t in texts]
    toks = [n_tokens(t) for t in texts]
    return {"n": len(texts),
            "chars": {"median": statistics.median(chars), "p90": _pct(chars, 90), "max": max(chars)},
            "tokens": {"median": statistics.median(toks), "p90": _pct(toks, 90), "max": max(toks)}}


def _answers_of(rec) -> list[str]:
    if isinstance(rec, SFTExample):
        return [rec.completion]
    if isinstance(rec, RankedGroup):
        return list(rec.answers)
    return [rec.reference] if rec.reference else []


def length_by_rank(groups: list[RankedGroup]) -> dict:
    """Mean answer length per rank, and how often the rank-1 answer is the longest of its group."""
    by_rank: dict[int, list[int]] = {}
    by_rank_tok: dict[int, list[int]] = {}
    longest_is_best = 0
    for g in groups:
        for a, r in zip(g.answers, g.ranks):
            by_rank.setdefault(r, []).append(len(a))
            by_rank_tok.setdefault(r, []).append(n_tokens(a))
        best_len = len(g.best)
        longest_is_best += best_len == max(len(a) for a in g.answers)
    table = {r: {"n": len(v), "mean_chars": round(statistics.mean(v), 2),
                 "mean_tokens": round(statistics.mean(by_rank_tok[r]), 2)} for r, v in sorted(by_rank.items())}
    share = longest_is_best / len(groups) if groups else 0.0
    # The accuracy a "prefer the longer answer" reward model would get on the pairs (ties count half).
    prs = [p for g in groups for p in g.pairs()]
    length_acc = (sum((len(p.chosen) > len(p.rejected)) + 0.5 * (len(p.chosen) == len(p.rejected)) for p in prs)
                  / len(prs)) if prs else None
    lower = [x for r, v in by_rank.items() if r > 1 for x in v]
    rank1 = by_rank.get(1, [])
    if not prs or not lower or not rank1:
        verdict = "no ranked groups with two different ranks"
    else:
        m1, ml = statistics.mean(rank1), statistics.mean(lower)
        verdict = (f"rank-1 answers are {'LONGER' if m1 > ml else 'not longer'} than lower-ranked answers on average "
                   f"({m1:.1f} vs {ml:.1f} chars) and the longest of their group in {share:.0%} of groups; "
                   f"'prefer the longer answer' agrees with {length_acc:.0%} of the {len(prs)} pairs"
                   + (" -> length is a SHORTCUT here: a reward model can win by preferring length "
                      "(watch rm/length_bias)." if length_acc > 0.6 else
                      " -> length alone does not predict the preference."))
    return {"by_rank": table, "rank1_longest_share": round(share, 4),
            "longer_wins_pair_share": None if length_acc is None else round(length_acc, 4), "verdict": verdict}


def duplicates(records: list) -> dict:
    """Rows that dedup_exact and then dedup_near would drop (exact copies of the normalised text; near copies,
    spacing variants included, of a row kept before them)."""
    keys = [dedup_text(r) for r in records]
    exact = len(keys) - len(set(keys))
    near = sum(1 for j, (i, _) in near_duplicates(keys).items() if keys[i] != keys[j])
    return {"exact": exact, "near": near}


def compute_stats(bundle: DataBundle) -> dict:
    splits = {"sft_train": bundle.sft_train, "rm_train": bundle.rm_train, "rm_eval": bundle.rm_eval,
              "ppo_prompts": bundle.ppo_prompts, "eval": bundle.eval}
    lengths = {name: {"prompt": length_summary([r.prompt for r in recs]),
                      "answer": length_summary([a for r in recs for a in _answers_of(r)])}
               for name, recs in splits.items()}
    groups = bundle.rm_train + bundle.rm_eval
    sizes = Counter(len(g.answers) for g in groups)
    ranks = Counter(r for g in groups for r in g.ranks)
    return {
        "version": bundle.version,
        "fingerprint": bundle.fingerprint,
        "counts": bundle.report.get("counts", {}),
        "lengths": lengths,
        "ranks": {"group_sizes": dict(sorted(sizes.items())), "answers_per_rank": dict(sorted(ranks.items())),
                  "pairs": sum(len(g.pairs()) for g in groups)},
        "length_by_rank": length_by_rank(groups),
        "duplicates": {name: duplicates(recs) for name, recs in splits.items()},
        "cleaning": {k: bundle.report.get(k) for k in ("filters", "filter_options", "dropped", "changed",
                                                       "dropped_examples", "eval_overlap_removed", "bad_rows",
                                                       "eval_source", "ppo_source", "sft_source", "tables")},
        "bad_rows": {k: v["bad_examples"] for k, v in bundle.report.get("files", {}).items()
                     if v and v["bad_rows"]},
    }


def format_stats(s: dict) -> str:
    """Plain-text report (what the CLI prints without --json)."""
    out = [f"data version {s['version']}  fingerprint {s['fingerprint'][:16]}", "", "counts per stage:"]
    stages = ["read", "after_eval_overlap", "after_cleaning", "final"]
    out.append(f"  {'split':<12}" + "".join(f"{x:>20}" for x in stages))
    for split, c in s["counts"].items():
        out.append(f"  {split:<12}" + "".join(f"{c.get(x, ''):>20}" for x in stages))
    out += ["", "lengths (chars | whitespace tokens): median p90 max"]
    for split, d in s["lengths"].items():
        for field, L in d.items():
            if L.get("n"):
                ch, tk = L["chars"], L["tokens"]
                out.append(f"  {split:<12} {field:<7} n={L['n']:<5} chars {ch['median']:>6} {ch['p90']:>5} "
                           f"{ch['max']:>5} | tokens {tk['median']:>5} {tk['p90']:>4} {tk['max']:>4}")
    r = s["ranks"]
    out += ["", f"ranked groups: sizes {r['group_sizes']}, answers per rank {r['answers_per_rank']}, "
                f"{r['pairs']} preference pairs"]
    out.append("mean answer length by rank (length-bias check):")
    for rank, row in s["length_by_rank"]["by_rank"].items():
        out.append(f"  rank {rank}: n={row['n']:<4} mean chars {row['mean_chars']:>7}  mean tokens "
                   f"{row['mean_tokens']:>6}")
    out.append("  " + s["length_by_rank"]["verdict"])
    out += ["", "duplicates left in this version (exact / near):"]
    for split, d in s["duplicates"].items():
        out.append(f"  {split:<12} {d['exact']:>4} / {d['near']}")
    c = s["cleaning"]
    out += ["", f"cleaning: filters {c['filters'] or '[] (as read)'}; eval prompts removed from training "
                f"{c['eval_overlap_removed']}; bad rows skipped {c['bad_rows']}"]
    out.append("  rows dropped per rule and split:")
    for rule, per in (c["dropped"] or {}).items():
        out.append(f"    {rule:<16} " + ", ".join(f"{k}={v}" for k, v in per.items()))
    for rule, per in (c["changed"] or {}).items():
        out.append(f"    {rule:<16} rewritten (not dropped): " + ", ".join(f"{k}={v}" for k, v in per.items()))
    for kind, reasons in s["bad_rows"].items():
        out.append(f"  bad {kind} rows, first: " + "; ".join(reasons))
    return "\n".join(out)


def format_dropped(report: dict) -> str:
    """The rows each rule dropped, per split, with a few examples and the reason: what `data prepare` prints so a
    user can judge every rule on their own data (the same examples are in cleaning_report.json)."""
    dropped = {r: per for r, per in (report.get("dropped") or {}).items() if any(per.values())}
    if not dropped:
        return "no rows dropped by the cleaning rules"
    out = ["rows dropped per rule and split (a few examples each; all reasons in cleaning_report.json):"]
    examples = report.get("dropped_examples") or {}
    for rule, per in dropped.items():
        out.append(f"  {rule}: " + ", ".join(f"{k}={v}" for k, v in per.items() if v))
        for split, rows in (examples.get(rule) or {}).items():
            for row in rows:
                text = f" | answer: {row['answer']}" if row.get("answer") else ""
                out.append(f"    [{split}] {row['why']} | prompt: {row['prompt']}{text}")
    return "\n".join(out)
