"""report.html (issue 20, part 1): built from the table objects, self-contained, and checked in a real browser.

The browser test opens the page in Debian's Chromium, headless, as ``report.html#selftest``: the page's own script
then clicks a table header twice, draws every Hangul syllable of the page on a canvas in the page's font and in a
font without Hangul (boxes), lists the resources the page fetched (Resource Timing) and the Content-Security-Policy
violations, and writes all that as JSON into the DOM, which ``--dump-dom`` returns. Chromium's net log is checked
too: no request whose network isolation key is the file's own (the browser's own update pings are not the page's).
A copy of the page without its embedded font is the negative control: there the check must find boxes.
Skipped, with a message, where no Chromium is installed (.ci/run installs Debian's ``chromium``).
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from analysis import html as report_html
from analysis.render import cell_parts, definitions, describe
from analysis.report import write_report
from analysis.groups import BEST
from test_analysis import make_kl_sweep, write_result

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Quiet, fast, and no background traffic of the browser's own (updates, sync, accounts).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
                  "--hide-scrollbars", "--disable-dev-shm-usage", "--virtual-time-budget=8000"]


def chromium() -> str | None:
    env = os.environ.get("RLHF_ABLATE_CHROMIUM")
    if env:
        return env
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A kl_coef sweep with Korean answers in every stage, per-step PPO history, a failed trial with its
    traceback, and the plots."""
    root = tmp_path_factory.mktemp("html")
    run = root / "run"
    make_kl_sweep(run, coefs=(0.01, 0.1, 1.0), seeds=(0, 1), n_prompts=8)
    for p in (run / "trials").glob("*/result.json"):
        res = json.loads(p.read_text())
        res["records"]["ppo"] = [{**r, "prompt": "한국의 수도는 어디인가요?", "reference": "서울입니다.",
                                  "generation": "대한민국의 수도는 서울입니다."} for r in res["records"]["ppo"]]
        for st, answer in (("base", "잘 모르겠습니다"), ("sft", "수도는 서울이에요.\n둘째 줄")):
            res["records"][st] = [{**r, "generation": answer, "reward": -1.0} for r in res["records"]["ppo"]]
        p.write_text(json.dumps(res, ensure_ascii=False))
    write_result(run, "tfail", axes={"ppo.kl_coef": 0.1}, seed=2, status="failed", index=99,
                 error={"type": "TrialFailed", "message": "CUDA out of memory", "stage": "ppo"})
    (run / "trials" / "tfail" / "error.txt").write_text("Traceback (most recent call last):\n"
                                                        "RuntimeError: CUDA out of memory\n")
    write_report(run)
    return run / "report"


def text_of(page: str) -> str:
    inline = re.sub(r"</?(strong|code|a|em|span)\b[^>]*>", "", page)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", inline)))


def plain(md: str) -> str:
    return re.sub(r"\s+", " ", md.replace("**", "").replace("`", "")).strip()


def test_html_holds_every_table_cell_bold_legend_and_footer_of_the_report(report):
    from analysis.report import build_report

    page = (report / "report.html").read_text(encoding="utf-8")
    text = text_of(page)
    rep = build_report(report.parent)
    assert rep.tables
    for t in rep.tables:
        assert f'id="tbl-{t.slug}"' in page and t.title in text
        for (r, c), cell in t.cells.items():
            value, n, sym = cell_parts(cell)
            if value:
                assert f"{value}" in text and f"({n})" in text
                if cell.mark == BEST:
                    assert f"<strong>{html.escape(value)}</strong>" in page
        # the same footer as report.md: notes, metric definitions, best vs runner-up
        for line in list(t.notes) + definitions(t, {}) + [describe(c) for c in t.comparisons]:
            if "not recorded" not in line:
                assert plain(line) in text, line
    assert "Bold: the best value of the tested rows" in text                       # the legend
    assert "Holm" in text and "Side by side" in text and "대한민국의 수도는 서울입니다." in text
    # hover: axis and seeds of a cell; links from rows to trial sections
    assert re.search(r'title="PPO: ppo\.kl_coef=0\.01 \| ppo/rougeL\nseeds 0, 1\nseed 0: ', page.replace("&#x27;", "'"))
    for tid in ("t0s0", "t2s1", "tfail"):
        assert f'href="#trial-{tid}"' in page and f'id="trial-{tid}"' in page
    # the failed trial's section: its error and the end of error.txt; every trial: curves and the alarm slot
    fail = page.split('id="trial-tfail"')[1].split("</section>")[0]
    assert "CUDA out of memory" in fail and "RuntimeError" in fail and 'class="failure"' in fail
    ok = page.split('id="trial-t0s0"')[1].split("</section>")[0]
    assert "ppo: objective/scores" in ok and "ppo: objective/kl" in ok and 'id="alarm-trial-t0s0"' in ok
    assert "Config (" in ok


def test_html_is_self_contained_offline(report):
    page = (report / "report.html").read_text(encoding="utf-8")
    assert page.startswith('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">')
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    # nothing from elsewhere: no absolute URL in any src/href, the font is a data URI, the plots inline SVG
    assert not re.search(r'(src|href)="(https?:|//)', page)
    assert not re.search(r'<(img|link|script)[^>]+(src|href)=', page)
    assert "src:url(data:font/ttf;base64," in page
    assert page.count("<figure") == 4 and page.count("<svg") >= 4 + 6
    assert 'href="frontier.png"' in page and 'href="ppo_kl_coef_ppo.csv"' in page   # the files beside it
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "duplicate ids (plots must not share clip paths or glyphs)"


def test_unknown_text_fields_of_a_table_are_rendered():
    """A field the statistics work adds to Table (a family statement, a footer) shows up without code here."""
    from analysis.groups import Table

    @dataclasses.dataclass
    class Richer(Table):
        family: str = ""
        footers: list = dataclasses.field(default_factory=list)

    t = Richer("s", "T", "rows", ["a"], None, [], [], [], {}, {}, family="Primary: **ROUGE-L**",
               footers=["Minimum detectable difference: 0.05"])
    fields = dict(report_html._extra_fields(t))
    assert fields == {"family": ["Primary: **ROUGE-L**"], "footers": ["Minimum detectable difference: 0.05"]}


def run_chromium(exe: str, url: str, *extra: str, timeout: float = 60) -> str:
    proc = subprocess.run([exe, *CHROMIUM_FLAGS, *extra, url], capture_output=True, text=True, timeout=timeout)
    return proc.stdout


def selftest(exe: str, page: Path, tmp: Path) -> tuple[dict, list[str]]:
    net = tmp / f"{page.stem}.netlog.json"
    dom = run_chromium(exe, page.resolve().as_uri() + "#selftest", f"--user-data-dir={tmp / 'profile'}",
                       f"--log-net-log={net}", "--dump-dom")
    m = re.search(r'<pre id="selftest-result" data-done="1">(.*?)</pre>', dom, re.S)
    assert m, "the page's self-test did not finish:\n" + dom[-2000:]
    result = json.loads(html.unescape(m.group(1)))
    log = json.loads(net.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    page_requests = [e["params"]["url"] for e in log["events"] if e["type"] == start
                     and "file://" in str(e.get("params", {}).get("network_isolation_key", ""))]
    return result, page_requests


@pytest.mark.browser
def test_report_html_in_headless_chromium(report, tmp_path):
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine: apt-get install chromium (Debian), as .ci/run does")
    page = report / "report.html"
    result, requests = selftest(exe, page, tmp_path)
    # the tables are there
    assert result["tables"] >= 1 + 3 + 1 and page.read_text().count("<table class=\"sortable\"") == result["tables"]
    # a sort works: one click ascending, the second descending, by the number the cell shows
    s = result["sort"]
    vals = [float(v) for v in s["before"]]
    assert [float(v) for v in s["ascending"]] == sorted(vals)
    assert [float(v) for v in s["descending"]] == sorted(vals, reverse=True) != vals
    assert s["aria"] == "descending"
    # Korean is drawn in a Hangul font: every syllable of the page differs from the box of a font without Hangul
    h = result["hangul"]
    assert h["chars"] >= 20 and h["boxes"] == "" and h["loaded"], h
    assert h["distinct"] == h["chars"] and h["fallback_distinct"] == 1, h
    # no request left the page
    assert result["requests"] == [] and result["violations"] == [] and requests == [], result
    # negative control: without the embedded font the same check finds boxes
    bare = tmp_path / "nofont.html"
    bare.write_text(re.sub(r"@font-face\{[^}]*\}", "", page.read_text(encoding="utf-8")), encoding="utf-8")
    control, _ = selftest(exe, bare, tmp_path)
    assert len(control["hangul"]["boxes"]) == control["hangul"]["chars"] > 0
    # and the screenshot a user would see
    shot = tmp_path / "report.png"
    run_chromium(exe, page.resolve().as_uri(), f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1800",
                 f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def test_pivot_one_seed_stopped_and_empty_runs_render(tmp_path):
    """Two axes (pivot tables, links in each cell), one seed, a stopped trial, and a run without metrics."""
    import numpy as np

    rng = np.random.default_rng(0)
    i = 0
    for rank in (8, 16):
        for coef in (0.05, 0.2):
            write_result(tmp_path / "grid", f"g{i}", axes={"lora_rank": rank, "ppo.kl_coef": coef}, seed=0, index=i,
                         metrics={"ppo/rougeL": float(rng.uniform(0.2, 0.4)), "ppo/kl_to_ref": float(coef)})
            i += 1
    write_result(tmp_path / "grid", "gs", axes={"lora_rank": 8, "ppo.kl_coef": 0.2}, seed=1, index=9,
                 status="stopped", error={"type": "EarlyStopped", "message": "ASHA", "ppo_step": 3})
    page = write_report(tmp_path / "grid", formats=("html",), plots=False).out_dir / "report.html"
    text = page.read_text(encoding="utf-8")
    assert 'id="tbl-lora_rank_x_ppo_kl_coef_ppo_rougel"' in text and "lora_rank \\ ppo.kl_coef" in text
    assert 'title="lora_rank=8, ppo.kl_coef=0.05 | ppo/rougeL\nseeds 0\nseed 0: ' in text
    assert 'href="#trial-g0"' in text and "Stopped early" in text and 'id="trial-gs"' in text
    assert not list(page.parent.glob("*.md"))                    # formats=("html",) writes only the page
    write_result(tmp_path / "empty", "e0", axes={}, seed=0, status="failed",
                 error={"type": "TrialFailed", "message": "boom", "stage": "sft"})
    empty = write_report(tmp_path / "empty", formats=("html",), plots=False).out_dir / "report.html"
    empty_text = empty.read_text(encoding="utf-8")
    assert "boom" in empty_text and not re.search(r"<table[^>]*data-selftest=", empty_text)


def test_missing_korean_font_is_a_problem_in_both_reports(tmp_path, monkeypatch):
    from analysis import htmlkit

    monkeypatch.setattr(htmlkit, "nanum_gothic_path", lambda: None)
    write_result(tmp_path, "k0", axes={"lora_rank": 8}, seed=0, metrics={"rm/kendall_tau": 0.3})
    rep = write_report(tmp_path, plots=False)
    page = (rep.out_dir / "report.html").read_text(encoding="utf-8")
    assert "No Korean font for report.html" in rep.markdown and "No Korean font for report.html" in page
    assert "@font-face" not in page
