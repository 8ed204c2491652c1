"""The report's plots, each drawn only when the results carry its data; every plot as PNG (200 dpi) and SVG.

- ``frontier``: RM reward of the aligned policy's answers against sqrt(KL to the reference), one point per trial,
  coloured by the swept axes (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization", plot reward
  against d = sqrt(KL), where the trade-off is close to a straight line for small d).
- ``rm_scores``: chosen and rejected score distributions per reward model (every (better, worse) pair of the
  held-out ranked groups, the pairs rm/chosen_mean and rm/rejected_mean average over).
- ``length_bias``: reward against answer length: the RM's scores of the held-out answers and the RM reward of the
  aligned policy's answers. A reward model that likes long answers shows a rising cloud.
- ``ppo_curves``: PPO training curves (objective/scores and objective/kl per step), per configuration, mean over
  seeds with the seeds as thin lines.

Titles are Korean and English. matplotlib's default font has no Hangul (docs/stack.md, "Plots"), so the figures
use NanumGothic (SIL Open Font License 1.1), which the ``koreanize-matplotlib`` pip dependency ships; we only add
its font file and never import that package (its import changes matplotlib's global settings and needs distutils,
gone in Python 3.12). Figures are made without pyplot (no global state) and saved without software or date
metadata, and SVG ids use a fixed salt, so the same results give the same bytes.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rlhf_ablate.metrics.registry import METHODS, stage_title
from .results import RunResults, TrialResult
from .identity import rm_id
from .groups import _sort_key, fmt_value

DPI = 200
MAX_PANELS = 12
KOREAN_FONT_PACKAGE = "koreanize-matplotlib"


@dataclass(frozen=True)
class Plot:
    filename: str
    title: str
    caption: str
    svg: str = ""


def korean_font_file() -> Optional[Path]:
    """NanumGothic.ttf from the koreanize-matplotlib package (None when not installed); report.html embeds a
    subset of it (analysis/htmlkit.py)."""
    spec = importlib.util.find_spec("koreanize_matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "fonts" / "NanumGothic.ttf"
    return path if path.is_file() else None


def korean_font() -> Optional[str]:
    """Register the bundled Hangul font with matplotlib and return its family name (None when not installed)."""
    path = korean_font_file()
    if path is None:
        return None
    from matplotlib import font_manager

    if not any(f.fname == str(path) for f in font_manager.fontManager.ttflist):
        font_manager.fontManager.addfont(str(path))
    return font_manager.FontProperties(fname=str(path)).get_name()


def _rc() -> dict:
    family = korean_font()
    return {"font.family": [family, "DejaVu Sans"] if family else ["DejaVu Sans"],
            "axes.unicode_minus": False,       # NanumGothic has no U+2212 minus sign
            "svg.hashsalt": "rlhf_ablate",     # stable element ids in the SVG
            "svg.fonttype": "path"}            # glyphs as paths: the SVG shows Hangul without the font installed


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _save(fig, out: Path, stem: str) -> tuple[str, str]:
    # No 'Software' (matplotlib version) and no date: byte-stable files for the same inputs.
    fig.savefig(out / f"{stem}.png", dpi=DPI, format="png", metadata={"Software": None})
    fig.savefig(out / f"{stem}.svg", format="svg", metadata={"Date": None, "Creator": None})
    return f"{stem}.png", f"{stem}.svg"


def _colors(n: int, cmap: str = "viridis") -> list:
    import matplotlib

    cm = matplotlib.colormaps[cmap]
    if n <= 1:
        return [cm(0.35)]
    return [cm(0.82 * i / (n - 1)) for i in range(n)]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _config(t: TrialResult, axes: list[str]) -> tuple:
    return tuple(t.axes.get(a) for a in axes)


def _config_label(key: tuple, axes: list[str]) -> str:
    return ", ".join(f"{a}={fmt_value(v)}" for a, v in zip(axes, key)) or "base config"


def _method(t: TrialResult) -> str:
    m = t.config.get("method", "ppo")
    return m if m in METHODS else "ppo"


def _stopped_note(run: RunResults) -> str:
    n = len(run.stopped_trials)
    return (f" {n} trial(s) stopped early by the scheduler are not shown (see \"Stopped early\": the survivors "
            "are the better seeds)." if n else "")


# ---------------------------------------------------------------------------------------------------------
def plot_frontier(run: RunResults, out: Path) -> Optional[Plot]:
    axes = run.axis_names
    pts = []
    for t in run.ok_trials:
        m = _method(t)
        kl, r = t.metrics.get(f"{m}/kl_to_ref"), t.metrics.get(f"{m}/reward_mean")
        if _finite(kl) and _finite(r):
            pts.append((t, m, kl, r))
    if not pts:
        return None
    configs = sorted({_config(t, axes) for t, *_ in pts}, key=lambda k: tuple(_sort_key(v) for v in k))
    colors = dict(zip(configs, _colors(len(configs))))
    markers = dict(zip(METHODS, "oDs^v<>"))
    fig = _figure(6.8, 4.6)
    ax = fig.subplots()
    clipped = 0
    for c in configs:
        for m in METHODS:
            sub = [(kl, r) for t, mm, kl, r in pts if _config(t, axes) == c and mm == m]
            if not sub:
                continue
            clipped += sum(kl < 0 for kl, _ in sub)
            xs = np.sqrt(np.maximum([kl for kl, _ in sub], 0.0))
            ys = np.array([r for _, r in sub])
            ax.scatter(xs, ys, color=colors[c], marker=markers[m], s=40, alpha=0.85, edgecolor="black",
                       linewidth=0.4, label=f"{_config_label(c, axes)} ({stage_title(m)}, {len(sub)} trials)")
            if len(sub) > 1:  # mean over seeds, as a cross
                ax.scatter([xs.mean()], [ys.mean()], color=colors[c], marker="X", s=120, edgecolor="black",
                           linewidth=0.8, zorder=3)
    over = [(t, kl, r) for t, _m, kl, r in pts if _finite((t.overoptimization or {}).get("onset_step"))]
    if over:  # the over-optimization alarm fired in these trials (analysis/overopt.py): a red ring around each
        ax.scatter(np.sqrt(np.maximum([kl for _, kl, _ in over], 0.0)), [r for *_, r in over], s=160,
                   facecolors="none", edgecolors="#c0392b", linewidth=1.5, zorder=4,
                   label=f"over-optimization alarm fired ({len(over)} trials)")
    ax.set_xlabel("√(KL to reference)  [√nats]")
    ax.set_ylabel("RM reward of the policy's answers (mean)")
    ax.set_title("보상 대 √KL: 시행마다 한 점\nReward vs √KL, one point per trial", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    png, svg = _save(fig, out, "frontier")
    cap = (f"RM reward (<method>/reward_mean) against √(<method>/kl_to_ref), one point per finished trial, coloured "
           f"by {', '.join(axes) or 'configuration'}; crosses mark the mean over seeds (Gao et al. 2022 plot "
           "reward against √KL).")
    if clipped:
        cap += f" {clipped} negative KL estimate(s) plotted at 0."
    if over:
        cap += (f" Red rings: the {len(over)} trial(s) whose over-optimization alarm fired (gold fell while the proxy "
                "rose; the section of that name).")
    cap += " Each trial's reward is scored by its own reward model (one per seed; RM units differ between RMs)."
    rm_by_seed: dict = {}
    for t, *_ in pts:
        rm_by_seed.setdefault(t.seed, set()).add(rm_id(t))
    if any(len(v) > 1 for v in rm_by_seed.values()):
        cap += (" The swept axes change the reward model too, so rewards of different colours are on different "
                "scales: compare their KL, not their reward.")
    return Plot(png, "Reward vs KL frontier", cap + _stopped_note(run), svg)


def _reward_models(run: RunResults) -> list[tuple[str, TrialResult]]:
    """One trial per distinct reward model (the RM stage's cache key, else the trial), with rm records."""
    seen: dict[str, TrialResult] = {}
    for t in run.ok_trials:
        recs = t.records.get("rm")
        if not isinstance(recs, list) or not recs:
            continue
        rm_t = t.timings.get("rm") if isinstance(t.timings.get("rm"), dict) else {}
        seen.setdefault(str(rm_t.get("key") or t.trial_id), t)
    out = []
    for t in sorted(seen.values(), key=lambda t: (tuple(_sort_key(v) for k, v in t.axes.items() if "kl" not in k),
                                                  t.seed if t.seed is not None else -1, t.trial_id)):
        label = ", ".join(f"{k}={fmt_value(v)}" for k, v in t.axes.items() if "kl" not in k) or "base config"
        out.append((label + (f", seed {t.seed}" if t.seed is not None else ""), t))
    return out


def _rm_pairs(t: TrialResult) -> tuple[list[float], list[float]]:
    chosen, rejected = [], []
    for rec in t.records.get("rm", []):
        if not isinstance(rec, dict):
            continue
        s, r = rec.get("scores"), rec.get("ranks")
        if not isinstance(s, list) or not isinstance(r, list) or len(s) != len(r):
            continue
        for i in range(len(s)):
            for j in range(len(s)):
                if _finite(s[i]) and _finite(s[j]) and r[i] < r[j]:
                    chosen.append(float(s[i]))
                    rejected.append(float(s[j]))
    return chosen, rejected


def plot_rm_scores(run: RunResults, out: Path) -> Optional[Plot]:
    rms = [(lab, t, *_rm_pairs(t)) for lab, t in _reward_models(run)]
    rms = [x for x in rms if x[2]]
    if not rms:
        return None
    shown = rms[:MAX_PANELS]
    ncols = min(3, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig = _figure(4.2 * ncols, 3.0 * nrows + 0.4)
    axs = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, (lab, t, ch, rj) in zip(axs, shown):
        # each RM on its own x range: raw scores of different RMs are on different scales
        lo, hi = min(ch + rj), max(ch + rj)
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 25)
        ax.hist(rj, bins=bins, alpha=0.55, color="tab:red", label=f"rejected / 비선호 (mean {np.mean(rj):.2f})")
        ax.hist(ch, bins=bins, alpha=0.55, color="tab:blue", label=f"chosen / 선호 (mean {np.mean(ch):.2f})")
        ax.axvline(np.mean(rj), color="tab:red", linestyle="--", linewidth=1)
        ax.axvline(np.mean(ch), color="tab:blue", linestyle="--", linewidth=1)
        ax.set_title(lab, fontsize=9)
        ax.set_xlabel("RM score")
        ax.set_ylabel("pairs")
        ax.legend(fontsize=7)
    for ax in axs[len(shown):]:
        ax.set_visible(False)
    fig.suptitle("보상 모델 점수 분포 (reward-model score distributions)", fontsize=11)
    png, svg = _save(fig, out, "rm_scores")
    cap = ("Chosen and rejected score distributions per reward model, over every (better, worse) pair of the "
           "held-out ranked groups; dashed lines are the means (rm/chosen_mean, rm/rejected_mean). Each panel has "
           "its own x range: scores are on each RM's own scale (rm/margin_standardized compares RMs).")
    if len(rms) > len(shown):
        cap += f" First {len(shown)} of {len(rms)} reward models shown."
    return Plot(png, "Reward model score distributions", cap, svg)


def _pearson(x: list[float], y: list[float]) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def plot_length_bias(run: RunResults, out: Path) -> Optional[Plot]:
    axes = run.axis_names
    # Left: RM scores of held-out human answers against their length, minus the prompt's mean score and length
    # (within-prompt, the definition of rm/length_bias), per RM configuration, pooled over seeds.
    rm_series: dict[str, tuple[list[float], list[float]]] = {}
    for lab, t in _reward_models(run):
        conf = lab.rsplit(", seed", 1)[0]
        xs, ys = rm_series.setdefault(conf, ([], []))
        for rec in t.records.get("rm", []):
            if not isinstance(rec, dict):
                continue
            s, ln = rec.get("scores"), rec.get("lengths")
            if isinstance(s, list) and isinstance(ln, list) and len(s) == len(ln) > 1 and \
                    all(_finite(a) and _finite(b) for a, b in zip(ln, s)):
                ms, ml = float(np.mean(s)), float(np.mean(ln))
                xs.extend(float(a) - ml for a in ln)
                ys.extend(float(b) - ms for b in s)
    rm_series = {k: v for k, v in rm_series.items() if v[0]}
    # Right: RM reward of the aligned policy's answers against their length, per configuration.
    pol_series: dict[tuple, tuple[list[float], list[float]]] = {}
    for t in run.ok_trials:
        recs = t.records.get(_method(t))
        if not isinstance(recs, list):
            continue
        xs, ys = pol_series.setdefault(_config(t, axes), ([], []))
        for rec in recs:
            if isinstance(rec, dict) and _finite(rec.get("response_len")) and _finite(rec.get("reward")):
                xs.append(float(rec["response_len"]))
                ys.append(float(rec["reward"]))
    pol_series = {k: v for k, v in sorted(pol_series.items(), key=lambda kv: tuple(_sort_key(v) for v in kv[0]))
                  if v[0]}
    panels = [p for p in (("rm", rm_series), ("policy", pol_series)) if p[1]]
    if not panels:
        return None
    fig = _figure(5.8 * len(panels), 4.4)
    axs = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)).ravel()
    for ax, (kind, series) in zip(axs, panels):
        cols = _colors(len(series))
        for col, (name, (xs, ys)) in zip(cols, series.items()):
            r = _pearson(xs, ys)
            lab = (name if kind == "rm" else _config_label(name, axes)) + (f" (r={r:+.2f})" if math.isfinite(r)
                                                                           else "")
            ax.scatter(xs, ys, s=10, alpha=0.5, color=col, label=lab)
            if math.isfinite(r):  # least-squares line, to make the slope visible in a dense cloud
                k, b0 = np.polyfit(xs, ys, 1)
                gx = np.array([min(xs), max(xs)])
                ax.plot(gx, k * gx + b0, color=col, linewidth=1.5)
        if kind == "rm":
            ax.set_title("보상 모델의 길이 편향: 같은 질문 안에서\nRM score vs answer length, within each prompt",
                         fontsize=10)
            ax.set_xlabel("answer length - prompt mean (characters, NFC)")
            ax.set_ylabel("RM score - prompt mean")
        else:
            ax.set_title("정책 답변의 보상 대 길이\nRM reward vs answer length (aligned policy)", fontsize=10)
            ax.set_xlabel("answer length (tokens)")
            ax.set_ylabel("RM reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    png, svg = _save(fig, out, "length_bias")
    cap = ("Left: each held-out answer's RM score against its length, both minus their prompt's mean, so only "
           "differences inside a prompt remain (rm/length_bias averages the within-prompt rank correlation). "
           "Right: reward of the aligned policy's greedy answers against their length. Lines: least squares, "
           "r: Pearson. A rising line means the reward model prefers longer answers." + _stopped_note(run))
    return Plot(png, "Length bias", cap, svg)


def plot_ppo_curves(run: RunResults, out: Path) -> Optional[Plot]:
    """Reward and KL per PPO step; with a gold probe (rlhf_ablate/ppo/gold.py) a third panel of gold's probe mean, and
    a dashed line at each trial's over-optimization onset (analysis/overopt.py)."""
    axes = run.axis_names
    gold_keys = ("gold/score",)
    keys = ("objective/scores", "objective/kl") + gold_keys
    series: dict[tuple, list[dict[str, list[tuple[float, float]]]]] = {}
    onsets: dict[tuple, list[float]] = {}
    for t in run.ok_trials:
        hist = t.history.get("ppo")
        if _method(t) != "ppo" or not isinstance(hist, list) or not hist:
            continue
        run_curves: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
        for i, row in enumerate(hist):
            if not isinstance(row, dict):
                continue
            step = row.get("step", i + 1)
            for k in keys:
                v = row.get(k, row.get(f"ppo/{k}"))
                if _finite(v) and _finite(step):
                    run_curves[k].append((float(step), float(v)))
        if any(run_curves.values()):
            series.setdefault(_config(t, axes), []).append(run_curves)
            s = (t.overoptimization or {}).get("onset_step")
            if _finite(s):
                onsets.setdefault(_config(t, axes), []).append(float(s))
    if not series:
        return None
    names = sorted(series, key=lambda n: tuple(_sort_key(v) for v in n))
    cols = dict(zip(names, _colors(len(names))))
    with_gold = any(rc["gold/score"] for runs in series.values() for rc in runs)
    panels = [("objective/scores", "reward (objective/scores)"), ("objective/kl", "KL to reference (objective/kl)")]
    if with_gold:
        panels.append(("gold/score", "gold reward on the probe (gold/score)"))
    fig = _figure(5.5 * len(panels), 4.2)
    axs = fig.subplots(1, len(panels))
    for ax, (k, ylabel) in zip(axs, panels):
        for name in names:
            runs = [rc[k] for rc in series[name] if rc[k]]
            for x in onsets.get(name, []):
                ax.axvline(x, color=cols[name], linestyle="--", linewidth=1.2, alpha=0.8)
            if not runs:
                continue
            for pts in runs:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=cols[name], alpha=0.3, linewidth=0.8)
            steps = sorted({p[0] for pts in runs for p in pts})
            mean = [np.mean([v for pts in runs for s, v in pts if s == st]) for st in steps]
            ax.plot(steps, mean, color=cols[name], linewidth=2,
                    label=f"{_config_label(name, axes)} ({len(runs)} seeds)")
        ax.set_xlabel("PPO step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axs[0].set_title("PPO 학습 중 보상 (reward during training)", fontsize=10)
    axs[1].set_title("PPO 학습 중 KL (KL during training)", fontsize=10)
    if with_gold:
        axs[2].set_title("골드 보상 (gold reward on held-out prompts)", fontsize=10)
    png, svg = _save(fig, out, "ppo_curves")
    n_on = sum(len(v) for v in onsets.values())
    return Plot(png, "PPO training curves",
                f"PPO training curves per {', '.join(axes) or 'configuration'}: mean over seeds (thick) and each seed "
                "(thin). Rewards are in each trial's RM units (normalised by the SFT policy's reward in PPO)."
                + (" Gold: the probe prompts' mean score by a reward the policy never trained against." if with_gold
                   else "")
                + (f" Dashed lines: the over-optimization onset of {n_on} trial(s) (gold fell while the proxy rose)."
                   if n_on else "") + _stopped_note(run), svg)


PLOTTERS = (plot_frontier, plot_rm_scores, plot_length_bias, plot_ppo_curves)


def make_plots(run: RunResults, out: Path, problems: Optional[list[str]] = None) -> list[Plot]:
    """Draw every plot the data supports into ``out``; a plot that fails is reported, not fatal."""
    if korean_font() is None and problems is not None:
        problems.append(f"No Korean font: Hangul in the plots renders as empty boxes. pip install "
                        f"{KOREAN_FONT_PACKAGE} (a dependency of rlhf_ablate) to get NanumGothic.")
    import matplotlib

    plots = []
    rc = _rc()
    for fn in PLOTTERS:
        try:
            with matplotlib.rc_context(rc):  # the font must be set while the text artists are made
                p = fn(run, out)
        except Exception as e:  # a broken plot must not cost the user the tables
            if problems is not None:
                problems.append(f"plot {fn.__name__} failed: {type(e).__name__}: {e}")
            continue
        if p is not None:
            plots.append(p)
    return plots
