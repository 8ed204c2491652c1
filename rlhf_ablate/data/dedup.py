"""Near-duplicate detection: MinHash signatures with independent hash functions, LSH banding, exact Jaccard check.

Texts are compared as sets of character 3-grams of the NFC, lower-cased text WITHOUT whitespace: Korean spacing
(띄어쓰기) varies freely between writers ("잘 하는" / "잘하는"), so spacing variants count as the same text.

- **Signatures.** Each 3-gram is hashed once to 32 bits (a splitmix64 finaliser of its three code points), then by
  NUM_PERM hash functions ``h_k(x) = (a_k * x + b_k) mod 2^64 >> 32`` (multiply-shift, Dietzfelbinger et al. 1997)
  with odd 64-bit ``a_k`` and ``b_k`` drawn once from a fixed-seed generator, so the functions are independent and
  the same on every machine. A text's signature is the minimum of each function over its 3-grams; two signatures
  agree in a position with probability ~ the Jaccard similarity J. The earlier signature used slopes ``2k + c``:
  nearly equal slopes order the 3-grams alike, all 32 "permutations" picked the same 3-gram, and recall at J = 0.88
  was 354/400 instead of ~0.997 (issue 11).
- **LSH.** BANDS bands of ROWS positions; a pair is a candidate when a whole band agrees:
  P(J) = 1 - (1 - J^ROWS)^BANDS = 0.985 at J = 0.8, 0.9996 at 0.85, 1.0000 at 0.9, and 0.0039 at 0.3, 0.00023 at 0.2
  (ROWS = 7, BANDS = 18). Many rows per band keep unrelated texts (which share common 3-grams, J ~ 0.1-0.3 for
  English) out of the candidates; with 4 rows per band 1 - (1 - 0.3^4)^8 = 6 % of such pairs were candidates, and
  dedup on HH approached O(n^2). benchmarks/bench_data.py measures the recall and the candidate rate.
- **Check.** Every candidate is checked with the exact Jaccard of its 3-gram sets: no false positives, only rare
  misses (the measured recall).

Everything up to the buckets is vectorised with numpy over all texts at once, so 50k texts take seconds.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from .readers import normalize_text

NEAR_DUP_THRESHOLD = 0.85  # char 3-gram Jaccard, spaces removed; short template prompts differing in one noun
# reach ~0.8, spacing variants score 1.0 and a changed final character in a 20-syllable text ~0.9
ROWS, BANDS = 7, 18
NUM_PERM = ROWS * BANDS
SEED = 20240611
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _perms() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    a = rng.integers(0, 2**63, size=NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
    b = rng.integers(0, 2**63, size=NUM_PERM, dtype=np.uint64)
    return a, b


_A, _B = _perms()


def _key(text: str) -> str:
    return "".join(normalize_text(text).lower().split())


def shingles(text: str, n: int = 3) -> set[str]:
    """Character n-grams of the normalised, lower-cased text without whitespace (the whole text if shorter)."""
    t = _key(text)
    return {t[i:i + n] for i in range(max(1, len(t) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed bijection of uint64 that spreads every input bit over the output."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _shingle_hashes(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(row id, 32-bit 3-gram hash) of every distinct 3-gram of every text, sorted by row: all texts at once."""
    padded = [k if len(k) >= 3 else (k + "\x01\x01\x01")[:3] for k in keys]  # a short text is one shingle: itself
    lengths = np.fromiter((len(k) for k in padded), dtype=np.int64, count=len(padded))
    cps = np.frombuffer("\x00".join(padded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    # position i starts a 3-gram of row r when i, i+1, i+2 all lie inside row r (the separator is \x00)
    valid = np.ones(len(cps) - 2, dtype=bool) if len(cps) >= 3 else np.zeros(0, dtype=bool)
    sep = np.flatnonzero(cps == 0)
    for off in (0, 1, 2):
        idx = sep - off
        valid[idx[(idx >= 0) & (idx < len(valid))]] = False
    pos = np.flatnonzero(valid)
    code = (cps[pos] << np.uint64(42)) | (cps[pos + 1] << np.uint64(21)) | cps[pos + 2]  # code points < 2^21
    row = np.searchsorted(starts, pos, side="right") - 1
    key = (row.astype(np.uint64) << np.uint64(32)) | (_mix(code) >> np.uint64(32))
    key.sort()  # sort + adjacent-difference: several times faster than np.unique's hash path on 10^7 keys
    key = key[np.concatenate(([True], key[1:] != key[:-1]))] if len(key) else key
    return (key >> np.uint64(32)).astype(np.int64), key & np.uint64(0xFFFFFFFF)


def signatures(texts: list[str], chunk: int = 1 << 20) -> np.ndarray:
    """MinHash signatures, shape (len(texts), NUM_PERM), uint32."""
    n = len(texts)
    sig = np.empty((n, NUM_PERM), dtype=np.uint32)
    if n == 0:
        return sig
    keys = [_key(t) for t in texts]
    rows, x = _shingle_hashes(keys)
    bounds = np.searchsorted(rows, np.arange(n + 1))
    # chunks of whole rows of about `chunk` shingles keep the working arrays in cache
    r0 = 0
    while r0 < n:
        r1 = int(np.searchsorted(bounds, bounds[r0] + chunk, side="right")) - 1
        r1 = min(n, max(r1, r0 + 1))
        xs = x[bounds[r0]:bounds[r1]]
        starts = bounds[r0:r1] - bounds[r0]
        h = np.empty_like(xs)
        with np.errstate(over="ignore"):
            for k in range(NUM_PERM):  # in place: no temporary arrays per function
                np.multiply(xs, _A[k], out=h)
                np.add(h, _B[k], out=h)
                np.right_shift(h, np.uint64(32), out=h)
                sig[r0:r1, k] = np.minimum.reduceat(h, starts)
        r0 = r1
    return sig


def band_keys(sig: np.ndarray) -> np.ndarray:
    """One 64-bit key per (text, band): a hash of the band's ROWS values (equal bands give equal keys; unequal
    bands collide with probability 2^-64, and candidates are checked exactly anyway)."""
    n = sig.shape[0]
    out = np.zeros((n, BANDS), dtype=np.uint64)
    s = sig.astype(np.uint64).reshape(n, BANDS, ROWS)
    with np.errstate(over="ignore"):
        for j in range(ROWS):
            out = _mix(out ^ s[:, :, j])
    return out + np.arange(BANDS, dtype=np.uint64)  # the band index is part of the key


def candidate_groups(texts: list[str]) -> Iterator[np.ndarray]:
    """Groups of text indices (ascending) that share a whole LSH band: every candidate pair lies in some group."""
    keys = band_keys(signatures(texts)).ravel()
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    cut = np.flatnonzero(sk[1:] != sk[:-1]) + 1
    for grp in np.split(order, cut):
        if len(grp) > 1:
            yield np.sort(grp // BANDS)


def near_duplicate_pairs(texts: list[str], threshold: float = NEAR_DUP_THRESHOLD) -> list[tuple[int, int, float]]:
    """(i, j, jaccard) with i < j for every candidate pair whose 3-gram Jaccard >= threshold (sorted)."""
    sh: dict[int, set[str]] = {}
    seen: set[tuple[int, int]] = set()
    out = []
    for grp in candidate_groups(texts):
        idx = grp.tolist()
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                if i == j or (i, j) in seen:
                    continue
                seen.add((i, j))
                si = sh.setdefault(i, shingles(texts[i]))
                sj = sh.setdefault(j, shingles(texts[j]))
                jac = jaccard(si, sj)
                if jac >= threshold:
                    out.append((i, j, jac))
    return sorted(out)


def near_duplicates(texts: list[str], threshold: float = NEAR_DUP_THRESHOLD) -> dict[int, tuple[int, float]]:
    """Greedy near-duplicate removal in file order: row j -> (earlier kept row i, jaccard) for every row that is a
    near duplicate (Jaccard >= threshold) of a row kept before it. Identical texts are found by hashing, not LSH.

    Each row is compared only with the kept rows of its buckets, so a large cluster of copies costs one comparison
    per copy, not one per pair."""
    keys = [_key(t) for t in texts]
    first: dict[str, int] = {}
    dropped: dict[int, tuple[int, float]] = {}
    uniq = []
    for i, k in enumerate(keys):
        if k in first:
            dropped[i] = (first[k], 1.0)
        else:
            first[k] = i
            uniq.append(i)
    if len(uniq) < 2:
        return dropped
    band = band_keys(signatures([texts[i] for i in uniq]))
    # A row none of whose band keys occurs twice has no candidate at all: it is kept without a look (most rows).
    flat = band.ravel()
    srt = np.sort(flat)
    shared = np.unique(srt[1:][srt[1:] == srt[:-1]])
    busy = np.flatnonzero(np.isin(band, shared).any(axis=1)) if len(shared) else np.zeros(0, dtype=np.int64)
    kept_in: dict[int, list[int]] = {}  # band key -> kept rows (indices into `uniq`)
    sets: dict[int, set[str]] = {}
    for u in busy.tolist():
        i = uniq[u]
        bk = band[u].tolist()
        match = None
        tried: set[int] = set()
        for key in bk:
            for v in kept_in.get(key, ()):
                if v in tried:
                    continue
                tried.add(v)
                su = sets.setdefault(u, shingles(texts[i]))
                sv = sets.setdefault(v, shingles(texts[uniq[v]]))
                jac = jaccard(su, sv)
                if jac >= threshold:
                    match = (uniq[v], jac)
                    break
            if match:
                break
        if match:
            dropped[i] = match
            sets.pop(u, None)
        else:
            for key in bk:
                kept_in.setdefault(key, []).append(u)
    return dropped


def candidate_rate(texts: list[str]) -> float:
    """Share of all pairs that LSH proposes as candidates (what the exact check has to pay for)."""
    pairs: set[tuple[int, int]] = set()
    for grp in candidate_groups(texts):
        idx = grp.tolist()
        pairs.update((idx[a], idx[b]) for a in range(len(idx)) for b in range(a + 1, len(idx)) if idx[a] != idx[b])
    n = len(texts)
    return len(pairs) / (n * (n - 1) / 2) if n > 1 else 0.0


def recall_at(pairs: Iterable[tuple[str, str]]) -> float:
    """Share of the given text pairs that LSH proposes as candidates (benchmarks/bench_data.py)."""
    pairs = list(pairs)
    hits = 0
    for a, b in pairs:
        keys = band_keys(signatures([a, b]))
        hits += bool(np.any(keys[0] == keys[1]))
    return hits / len(pairs) if pairs else float("nan")
