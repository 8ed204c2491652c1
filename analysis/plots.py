"""The report's plots (PNG), each drawn only when the results carry its data.

- ``frontier.png``: RM reward of PPO generations against sqrt(KL to the reference), one point per trial, coloured by
  kl_coef. Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization") plot reward against
  d = sqrt(KL), where the reward/KL trade-off is close to a straight line for small d.
- ``rm_scores.png``: chosen and rejected score distributions per reward model (every (better, worse) pair of the
  held-out ranked groups, the pairs rm/chosen_mean and rm/rejected_mean average over).
- ``length_bias.png``: reward against response length, for the RM's scores of the held-out answers and, when PPO
  ran, for the RM reward of PPO generations. A reward model that likes long answers shows a rising cloud.
- ``ppo_curves.png``: PPO training curves (objective/scores and objective/kl per step), per kl_coef, mean over
  seeds with the seeds as thin lines.
Figures are made without pyplot (no global state) and saved without the Software/date metadata, so the same
results give the same bytes. Labels are English, so no Korean font is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .results import RunResults, TrialResult
from .tables import _sort_key, fmt_value

DPI = 110
MAX_PANELS = 12


@dataclass(frozen=True)
class Plot:
    filename: str
    title: str
    caption: str


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _save(fig, path: Path) -> None:
    # No 'Software' (matplotlib version) and no timestamps: byte-stable PNGs for the same inputs.
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})


def _colors(n: int, cmap: str = "viridis") -> list:
    import matplotlib

    cm = matplotlib.colormaps[cmap]
    if n <= 1:
        return [cm(0.35)]
    return [cm(0.82 * i / (n - 1)) for i in range(n)]


def _kl_coef(t: TrialResult) -> Any:
    for k in ("ppo.kl_coef",):
        if k in t.axes:
            return t.axes[k]
        if k in t.config:
            return t.config[k]
    return None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _axes_label(t: TrialResult, skip: tuple[str, ...] = ()) -> str:
    parts = [f"{k}={fmt_value(v)}" for k, v in t.axes.items() if k not in skip]
    return ", ".join(parts) or "base config"


def _is_ppo(t: TrialResult) -> bool:
    return t.config.get("method", "ppo") == "ppo"


# ---------------------------------------------------------------------------------------------------------
def plot_frontier(run: RunResults, out: Path) -> Optional[Plot]:
    pts = [(t, t.metrics["ppo/kl_to_ref"], t.metrics["ppo/reward_mean"]) for t in run.ok_trials
           if _is_ppo(t) and _finite(t.metrics.get("ppo/kl_to_ref")) and _finite(t.metrics.get("ppo/reward_mean"))]
    if not pts:
        return None
    coefs = sorted({_kl_coef(t) for t, _, _ in pts}, key=_sort_key)
    colors = dict(zip(coefs, _colors(len(coefs))))
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    clipped = 0
    for c in coefs:
        sub = [(kl, r) for t, kl, r in pts if _kl_coef(t) == c]
        clipped += sum(kl < 0 for kl, _ in sub)
        xs = np.sqrt(np.maximum([kl for kl, _ in sub], 0.0))
        ys = np.array([r for _, r in sub])
        ax.scatter(xs, ys, color=colors[c], s=36, alpha=0.8, edgecolor="black", linewidth=0.4,
                   label=f"kl_coef={fmt_value(c)} ({len(sub)} trials)")
        if len(sub) > 1:  # mean over seeds, as a cross
            ax.scatter([xs.mean()], [ys.mean()], color=colors[c], marker="X", s=110, edgecolor="black",
                       linewidth=0.8, zorder=3)
    ax.set_xlabel("sqrt(KL to reference)  [sqrt(nats)]")
    ax.set_ylabel("RM reward of PPO generations (mean)")
    ax.set_title("Reward vs sqrt(KL): one point per PPO trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, out / "frontier.png")
    cap = ("RM reward (ppo/reward_mean) against sqrt(ppo/kl_to_ref), one point per finished PPO trial, coloured by "
           "kl_coef; crosses mark the mean over seeds (Gao et al. 2022 plot reward against sqrt(KL)).")
    if clipped:
        cap += f" {clipped} negative KL estimate(s) plotted at 0."
    if len({_axes_label(t, ("ppo.kl_coef",)) for t, _, _ in pts}) > 1:
        cap += " Trials with different reward models are pooled; their reward scales may differ."
    return Plot("frontier.png", "Reward vs KL frontier", cap)


def _reward_models(run: RunResults) -> list[tuple[str, TrialResult]]:
    """One trial per distinct reward model (the RM stage's cache key, else the trial), with rm records."""
    seen: dict[str, TrialResult] = {}
    for t in run.ok_trials:
        recs = t.records.get("rm")
        if not isinstance(recs, list) or not recs:
            continue
        rm_t = t.timings.get("rm") if isinstance(t.timings.get("rm"), dict) else {}
        key = str(rm_t.get("key") or t.trial_id)
        seen.setdefault(key, t)
    out = []
    # numeric order of axis values (8 before 16), then seed
    for t in sorted(seen.values(), key=lambda t: (tuple(_sort_key(v) for k, v in t.axes.items()
                                                        if k != "ppo.kl_coef"),
                                                  t.seed if t.seed is not None else -1, t.trial_id)):
        # kl_coef does not change the RM; leave it out of the label
        label = _axes_label(t, ("ppo.kl_coef",)) + (f", seed {t.seed}" if t.seed is not None else "")
        out.append((label, t))
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
    fig = _figure(4.2 * ncols, 3.0 * nrows)
    axs = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    # one score range for every panel, so separations can be compared by eye across reward models
    lo = min(min(ch + rj) for _, _, ch, rj in shown)
    hi = max(max(ch + rj) for _, _, ch, rj in shown)
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 25)
    for ax, (lab, t, ch, rj) in zip(axs, shown):
        ax.hist(rj, bins=bins, alpha=0.55, color="tab:red", label=f"rejected (mean {np.mean(rj):.2f})")
        ax.hist(ch, bins=bins, alpha=0.55, color="tab:blue", label=f"chosen (mean {np.mean(ch):.2f})")
        ax.axvline(np.mean(rj), color="tab:red", linestyle="--", linewidth=1)
        ax.axvline(np.mean(ch), color="tab:blue", linestyle="--", linewidth=1)
        ax.set_title(lab, fontsize=9)
        ax.set_xlabel("RM score")
        ax.set_ylabel("pairs")
        ax.legend(fontsize=7)
    for ax in axs[len(shown):]:
        ax.set_visible(False)
    _save(fig, out / "rm_scores.png")
    cap = ("Chosen and rejected score distributions per reward model, over every (better, worse) pair of the held-out "
           "ranked groups; dashed lines are the means (rm/chosen_mean, rm/rejected_mean). Scores are on each RM's "
           "own scale; all panels share one x range.")
    if len(rms) > len(shown):
        cap += f" First {len(shown)} of {len(rms)} reward models shown."
    return Plot("rm_scores.png", "Reward model score distributions", cap)


def _pearson(x: list[float], y: list[float]) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def plot_length_bias(run: RunResults, out: Path) -> Optional[Plot]:
    # Left: RM scores of held-out human answers against their length, pooled over seeds per RM configuration.
    rm_series: dict[str, tuple[list[float], list[float]]] = {}
    for lab, t in _reward_models(run):
        conf = _axes_label(t, ("ppo.kl_coef",))
        xs, ys = rm_series.setdefault(conf, ([], []))
        for rec in t.records.get("rm", []):
            if not isinstance(rec, dict):
                continue
            s, ln = rec.get("scores"), rec.get("lengths")
            if isinstance(s, list) and isinstance(ln, list) and len(s) == len(ln):
                for a, b in zip(ln, s):
                    if _finite(a) and _finite(b):
                        xs.append(float(a))
                        ys.append(float(b))
    rm_series = {k: v for k, v in rm_series.items() if v[0]}
    # Right: RM reward of PPO generations against their length, per kl_coef.
    ppo_series: dict[Any, tuple[list[float], list[float]]] = {}
    for t in run.ok_trials:
        recs = t.records.get("ppo")
        if not _is_ppo(t) or not isinstance(recs, list):
            continue
        xs, ys = ppo_series.setdefault(_kl_coef(t), ([], []))
        for rec in recs:
            if isinstance(rec, dict) and _finite(rec.get("response_len")) and _finite(rec.get("reward")):
                xs.append(float(rec["response_len"]))
                ys.append(float(rec["reward"]))
    ppo_series = {k: v for k, v in sorted(ppo_series.items(), key=lambda kv: _sort_key(kv[0])) if v[0]}
    panels = [p for p in (("rm", rm_series), ("ppo", ppo_series)) if p[1]]
    if not panels:
        return None
    fig = _figure(5.6 * len(panels), 4.2)
    axs = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)).ravel()
    for ax, (kind, series) in zip(axs, panels):
        cols = _colors(len(series), "viridis" if kind == "ppo" else "tab10")
        for col, (name, (xs, ys)) in zip(cols, series.items()):
            r = _pearson(xs, ys)
            lab = (f"kl_coef={fmt_value(name)}" if kind == "ppo" else name) + \
                (f" (r={r:+.2f})" if math.isfinite(r) else "")
            ax.scatter(xs, ys, s=10, alpha=0.5, color=col, label=lab)
            if math.isfinite(r):  # least-squares line, to make the slope visible in a dense cloud
                k, b0 = np.polyfit(xs, ys, 1)
                gx = np.array([min(xs), max(xs)])
                ax.plot(gx, k * gx + b0, color=col, linewidth=1.5)
        if kind == "rm":
            ax.set_title("RM score vs answer length (held-out ranked groups)", fontsize=10)
            ax.set_xlabel("answer length (characters, NFC)")
            ax.set_ylabel("RM score")
        else:
            ax.set_title("RM reward vs response length (PPO generations)", fontsize=10)
            ax.set_xlabel("response length (tokens)")
            ax.set_ylabel("RM reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, out / "length_bias.png")
    cap = ("Reward against response length, with a least-squares line and Pearson r per series. A rising line means "
           "the reward model prefers longer answers (length bias, rm/length_corr).")
    return Plot("length_bias.png", "Length bias", cap)


def plot_ppo_curves(run: RunResults, out: Path) -> Optional[Plot]:
    keys = ("objective/scores", "objective/kl")
    other_axes = [a for a in run.axis_names if a != "ppo.kl_coef"]
    series: dict[Any, list[dict[str, list[tuple[float, float]]]]] = {}
    for t in run.ok_trials:
        hist = t.history.get("ppo")
        if not _is_ppo(t) or not isinstance(hist, list) or not hist:
            continue
        # per kl_coef; when other axes are swept too, a curve per full configuration
        name = (_kl_coef(t),) + tuple(t.axes.get(a) for a in other_axes)
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
            series.setdefault(name, []).append(run_curves)
    if not series:
        return None
    names = sorted(series, key=lambda n: tuple(_sort_key(v) for v in n))
    cols = dict(zip(names, _colors(len(names))))
    fig = _figure(11.0, 4.0)
    axs = fig.subplots(1, 2)
    for ax, k, ylabel in zip(axs, keys, ("reward (objective/scores)", "KL to reference (objective/kl)")):
        for name in names:
            runs = [rc[k] for rc in series[name] if rc[k]]
            if not runs:
                continue
            for pts in runs:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=cols[name], alpha=0.3, linewidth=0.8)
            steps = sorted({p[0] for pts in runs for p in pts})
            mean = [np.mean([v for pts in runs for s, v in pts if s == st]) for st in steps]
            label = f"kl_coef={fmt_value(name[0])}" + "".join(
                f", {a}={fmt_value(v)}" for a, v in zip(other_axes, name[1:]))
            ax.plot(steps, mean, color=cols[name], linewidth=2, label=f"{label} ({len(runs)} seeds)")
        ax.set_xlabel("PPO step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axs[0].set_title("PPO reward during training", fontsize=10)
    axs[1].set_title("PPO KL during training", fontsize=10)
    _save(fig, out / "ppo_curves.png")
    return Plot("ppo_curves.png", "PPO training curves",
                "PPO training curves per kl_coef: mean over seeds (thick) and each seed (thin).")


PLOTTERS = (plot_frontier, plot_rm_scores, plot_length_bias, plot_ppo_curves)


def make_plots(run: RunResults, out: Path, problems: Optional[list[str]] = None) -> list[Plot]:
    """Draw every plot the data supports into ``out``; a plot that fails is reported, not fatal."""
    plots = []
    for fn in PLOTTERS:
        try:
            p = fn(run, out)
        except Exception as e:  # a broken plot must not cost the user the tables
            if problems is not None:
                problems.append(f"plot {fn.__name__} failed: {type(e).__name__}: {e}")
            continue
        if p is not None:
            plots.append(p)
    return plots
