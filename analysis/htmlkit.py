"""The parts of report.html that are not about the report: the embedded Hangul font, small SVG line charts, the
stylesheet and the script (sorting, and the self-test the browser test reads). analysis/html.py builds the page.

Why a font subset (docs/architecture.md, "report.html"): a headless Chromium with no Korean system font draws boxes,
and so does a full NanumGothic (4.5 MB) embedded as a data URI, or a font file beside the page (``file://`` fonts
are blocked). A subset of NanumGothic with only the characters of the page, as a base64 ``@font-face``, draws
correctly (FACTS, "Hangul in a page, offline"). The font comes from the ``koreanize-matplotlib`` dependency, which
the plots use too (analysis/plots.py); fontTools is a dependency of matplotlib.

Everything here is deterministic: the same page text gives the same font bytes and the same SVG.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import html
import io
import math
import re
from pathlib import Path
from typing import Optional, Sequence

FONT_FAMILY = "RA Hangul"
# Hangul Jamo, compatibility Jamo, syllables, and the CJK symbols/fullwidth forms Korean text uses.
HANGUL_RANGES = ("U+1100-11FF", "U+3000-303F", "U+3130-318F", "U+A960-A97F", "U+AC00-D7AF", "U+D7B0-D7FF",
                 "U+FF00-FFEF")
_HANGUL_RE = re.compile("[\u1100-\u11ff\u3000-\u303f\u3130-\u318f\ua960-\ua97f\uac00-\ud7af\ud7b0-\ud7ff"
                        "\uff00-\uffef]")

# The page may load nothing: no network, no file beside it. Fonts and images are data URIs, styles and scripts
# inline. The browser test checks that no request left the page.
CSP = ("default-src 'none'; img-src data:; font-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")


def nanum_gothic_path() -> Optional[Path]:
    from .plots import korean_font_file

    return korean_font_file()


def hangul_chars(text: str) -> str:
    """The distinct characters of ``text`` that the embedded font is for, sorted (deterministic subset)."""
    return "".join(sorted(set(_HANGUL_RE.findall(text))))


def font_problem() -> Optional[str]:
    """Why the page cannot embed its Hangul font (None when it can)."""
    if nanum_gothic_path() is None:
        return ("No Korean font for report.html: Hangul may show as boxes. pip install koreanize-matplotlib "
                "(a dependency of rlhf_ablate).")
    if importlib.util.find_spec("fontTools") is None:   # matplotlib depends on fontTools: a broken install
        return "fontTools is missing (a matplotlib dependency): report.html cannot embed its Hangul font."
    return None


def font_face(text: str) -> tuple[str, Optional[str]]:
    """(@font-face CSS, problem) for a NanumGothic subset with the Hangul of ``text``. Empty CSS when the page has
    no Hangul; a problem line when it has Hangul but the font or fontTools is missing."""
    chars = hangul_chars(text)
    if not chars:
        return "", None
    return _font_face(chars, nanum_gothic_path())


@functools.lru_cache(maxsize=8)
def _font_face(chars: str, path: Optional[Path]) -> tuple[str, Optional[str]]:
    if path is None:
        return "", ("No Korean font for report.html: Hangul may show as boxes. pip install koreanize-matplotlib "
                    "(a dependency of rlhf_ablate).")
    try:
        from fontTools import subset
        from fontTools.ttLib import TTFont
    except ImportError:  # matplotlib depends on fontTools, so this is a broken install
        return "", "fontTools is missing (a matplotlib dependency): report.html cannot embed its Hangul font."
    opts = subset.Options()
    opts.hinting = False              # hints are for low-resolution screens of the 2000s; half the bytes
    opts.desubroutinize = True
    opts.name_IDs = [1, 2]            # family and style names only
    opts.notdef_outline = True
    opts.recalc_timestamp = False     # same text, same bytes
    opts.layout_features = ["*"]
    opts.drop_tables += ["TSI0", "TSI1", "TSI2", "TSI3", "TSI5"]   # VTT hinting sources: not for a browser
    font = TTFont(str(path), recalcTimestamp=False)
    sub = subset.Subsetter(opts)
    sub.populate(text=chars)
    sub.subset(font)
    buf = io.BytesIO()
    font.save(buf)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    css = (f"@font-face{{font-family:\"{FONT_FAMILY}\";src:url(data:font/ttf;base64,{data}) format(\"truetype\");"
           f"unicode-range:{','.join(HANGUL_RANGES)};font-display:block}}")
    return css, None


# ---------------------------------------------------------------------------------------------------------
# SVG
# ---------------------------------------------------------------------------------------------------------
def inline_svg(svg: str, prefix: str) -> str:
    """A matplotlib SVG file as an inline ``<svg>`` element: no XML prolog, and every id prefixed so that several
    plots in one page cannot refer to each other's clip paths or glyphs."""
    svg = re.sub(r"^\s*<\?xml[^>]*>\s*", "", svg)
    svg = re.sub(r"<!DOCTYPE[^>]*>\s*", "", svg)
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = re.sub(r"<!--.*?-->\s*", "", svg, flags=re.S)
    svg = re.sub(r"\n[ \t]+", "\n", svg)             # indentation: a tenth of the bytes
    svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m.group(1)}"', svg)
    svg = re.sub(r'(xlink:href|href)="#([^"]+)"', lambda m: f'{m.group(1)}="#{prefix}-{m.group(2)}"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}-{m.group(1)})", svg)
    return svg.strip()


def _tick(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    return f"{v:.3g}" if 1e-3 <= a < 1e4 else f"{v:.2e}"


def line_chart(title: str, series: Sequence[tuple[str, Sequence[tuple[float, float]]]], *, width: int = 300,
               height: int = 150, xlabel: str = "step") -> str:
    """A small SVG line chart: one polyline per (label, [(x, y), ...]), min/max ticks on both axes. Text is page
    text (the embedded font draws its Hangul), so a chart costs a few hundred bytes, not a matplotlib figure."""
    pts = [(x, y) for _, s in series for x, y in s if math.isfinite(x) and math.isfinite(y)]
    esc = html.escape
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) or 1) * 0.05, y1 + (abs(y1) or 1) * 0.05
    L, R, T, B = 46, 8, 20, 26
    pw, ph = width - L - R, height - T - B

    def sx(x: float) -> float:
        return L + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return T + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label="{esc(title)}">',
           f'<text x="{L}" y="13" class="ct">{esc(title)}</text>',
           f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" class="frame"/>']
    if y0 < 0 < y1:
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{sy(0):.1f}" y2="{sy(0):.1f}" class="zero"/>')
    out += [f'<text x="{L - 3}" y="{T + 8}" class="tk" text-anchor="end">{_tick(y1)}</text>',
            f'<text x="{L - 3}" y="{T + ph}" class="tk" text-anchor="end">{_tick(y0)}</text>',
            f'<text x="{L}" y="{height - 12}" class="tk">{_tick(x0)}</text>',
            f'<text x="{L + pw}" y="{height - 12}" class="tk" text-anchor="end">{_tick(x1)}</text>',
            f'<text x="{L + pw / 2:.0f}" y="{height - 2}" class="tk" text-anchor="middle">{esc(xlabel)}</text>']
    for i, (label, s) in enumerate(series):
        good = [(x, y) for x, y in s if math.isfinite(x) and math.isfinite(y)]
        if not good:
            continue
        cls = f"s{i % 6}"
        if len(good) == 1:
            x, y = good[0]
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" class="{cls}"><title>{esc(label)}'
                       f'</title></circle>')
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
        out.append(f'<polyline points="{path}" class="{cls}"><title>{esc(label)}</title></polyline>')
    out.append("</svg>")
    return "".join(out)


# ---------------------------------------------------------------------------------------------------------
# Style and script
# ---------------------------------------------------------------------------------------------------------
CSS = """
:root{--fg:#1d2430;--muted:#5d6776;--line:#d9dee5;--bg-alt:#f5f7fa;--accent:#1f5fae;--ref:#8a93a0}
*{box-sizing:border-box}
body{font-family:"RA Hangul",system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","DejaVu Sans",Arial,sans-serif;
 color:var(--fg);margin:0;line-height:1.45;font-size:14px}
main{max-width:1500px;margin:0 auto;padding:16px 24px 64px}
main p,main>ul,ul.notes,.legend,figcaption,blockquote{max-width:1050px}
nav.toc{position:sticky;top:0;background:#fff;border-bottom:1px solid var(--line);padding:6px 24px;z-index:5;
 font-size:13px;white-space:nowrap;overflow-x:auto}
nav.toc a{margin-right:14px;color:var(--accent);text-decoration:none}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:2px solid var(--line);
 padding-bottom:4px}h3{font-size:15px;margin:22px 0 6px}
a{color:var(--accent)}
code{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12px;background:var(--bg-alt);
 padding:0 3px;border-radius:3px}
.muted,.files{color:var(--muted);font-size:12px}
.wrap{overflow-x:auto}
table{border-collapse:collapse;margin:6px 0 4px;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:4px 8px;vertical-align:top;text-align:left}
thead th{background:var(--bg-alt);border-bottom:2px solid #b9c1cc;white-space:nowrap;position:relative}
table.sortable thead th{cursor:pointer;user-select:none;padding-right:18px}
table.sortable thead th::after{content:"\\2195";position:absolute;right:4px;color:#aab2bd;font-size:11px}
table.sortable thead th[aria-sort=ascending]::after{content:"\\25B2";color:var(--accent)}
table.sortable thead th[aria-sort=descending]::after{content:"\\25BC";color:var(--accent)}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
td.num .n{color:var(--muted);font-size:10.5px;display:block;line-height:1.1}
td.num strong{color:#0b3d78}
td .mark{color:#b35c00;margin-left:2px}
tr.ref td{color:var(--ref);background:#fbfbfc}
tbody tr:hover td{background:#eef4fb}
td.trials{white-space:nowrap}td.trials a,td.num .trials a{font-size:11px;margin-right:4px}
tbody td:first-child{white-space:nowrap}
ul.notes{margin:4px 0 8px 18px;padding:0;font-size:12.5px;color:#39424e}
ul.notes li{margin:2px 0}
.legend{font-size:13px;color:#39424e;background:var(--bg-alt);padding:8px 12px;border-radius:4px}
details>summary{cursor:pointer;color:var(--accent);font-size:13px}
blockquote{margin:6px 0;padding:6px 12px;border-left:3px solid var(--line);background:var(--bg-alt);
 white-space:pre-wrap}
td.answer{white-space:pre-wrap;max-width:640px}
figure{margin:12px 0 24px}figure svg{max-width:100%;height:auto}
figcaption{font-size:12.5px;color:#39424e;max-width:980px}
.charts{display:flex;flex-wrap:wrap;gap:8px}
svg.chart{background:#fff;border:1px solid var(--line);border-radius:3px}
svg.chart text{font-size:10px;fill:var(--muted)}svg.chart text.ct{font-size:11px;fill:var(--fg)}
svg.chart .frame{fill:none;stroke:var(--line)}svg.chart .zero{stroke:#c4cad3;stroke-dasharray:3 3}
svg.chart polyline{fill:none;stroke-width:1.6}
.s0{stroke:#1f5fae;fill:#1f5fae}.s1{stroke:#d9622b;fill:#d9622b}.s2{stroke:#2e8b57;fill:#2e8b57}
.s3{stroke:#8e44ad;fill:#8e44ad}.s4{stroke:#b8860b;fill:#b8860b}.s5{stroke:#555;fill:#555}
section.trial{border-top:1px solid var(--line);margin-top:18px;scroll-margin-top:32px}
section.trial:target{background:#fffbe6}
.status-ok{color:#2e7d32}.status-failed{color:#c62828;font-weight:bold}.status-stopped{color:#b35c00}
.failure{border:1px solid #e3a5a5;background:#fdf3f3;padding:8px 12px;border-radius:4px}
.failure pre{white-space:pre-wrap;font-size:11.5px;max-height:320px;overflow:auto}
.alarm-slot:empty{display:none}
#selftest-result{display:none}
"""

# Sorting: click a header; numbers sort by the cell's data-sort (the mean), text in natural order; empty cells
# last. The self-test (opened as report.html#selftest) sorts a table, checks that the Hangul of the page is drawn
# by the embedded font (distinct glyphs, unlike the boxes of a font without Hangul) and that nothing was fetched,
# and writes JSON into #selftest-result, which tests/test_report_html.py reads with chromium --dump-dom.
JS = r"""
(function(){
"use strict";
var violations=[];
document.addEventListener("securitypolicyviolation",function(e){
  violations.push(e.blockedURI+" "+e.violatedDirective);});
function key(td){if(!td)return null;var s=td.getAttribute("data-sort");if(s===null)s=td.textContent.trim();return s;}
function sortTable(table,col,dir){
  var tb=table.tBodies[0];if(!tb)return;var rows=Array.prototype.slice.call(tb.rows);
  var nums=rows.every(function(r){var k=key(r.cells[col]);return k===null||k===""||!isNaN(parseFloat(k));});
  rows.sort(function(a,b){var x=key(a.cells[col]),y=key(b.cells[col]);
    var ex=(x===null||x===""),ey=(y===null||y==="");if(ex||ey)return ex===ey?0:(ex?1:-1);
    var c=nums?parseFloat(x)-parseFloat(y):x.localeCompare(y,undefined,{numeric:true});return dir*c;});
  rows.forEach(function(r){tb.appendChild(r);});
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
    if(i===col)th.setAttribute("aria-sort",dir>0?"ascending":"descending");else th.removeAttribute("aria-sort");});
}
function wire(){
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"),function(table){
    if(!table.tHead)return;
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
      th.title=(th.title?th.title+" \u2014 ":"")+"click to sort";
      th.addEventListener("click",function(){sortTable(table,i,th.getAttribute("aria-sort")==="ascending"?-1:1);});
    });
  });
}
function glyphs(font,ch){
  var c=document.createElement("canvas");c.width=64;c.height=64;var g=c.getContext("2d");
  g.fillStyle="#fff";g.fillRect(0,0,64,64);g.fillStyle="#000";g.font="40px "+font;g.textBaseline="top";
  g.fillText(ch,8,8);var d=g.getImageData(0,0,64,64).data,s=[],ink=0;
  for(var i=0;i<d.length;i+=4){var v=d[i]<128?1:0;ink+=v;s.push(v);}return {sig:s.join(""),ink:ink};
}
function selftest(){
  var out={tables:document.querySelectorAll("table.sortable").length,sort:null,hangul:null,requests:null};
  var t=document.querySelector("table[data-selftest]")||document.querySelector("table.sortable");
  if(t&&t.tBodies[0]&&t.tBodies[0].rows.length>1){
    var col=parseInt(t.getAttribute("data-selftest")||"0",10),th=t.tHead.rows[0].cells[col];
    var before=Array.prototype.map.call(t.tBodies[0].rows,function(r){return key(r.cells[col]);});
    th.click();var up=Array.prototype.map.call(t.tBodies[0].rows,function(r){return key(r.cells[col]);});
    th.click();var down=Array.prototype.map.call(t.tBodies[0].rows,function(r){return key(r.cells[col]);});
    out.sort={table:t.id,column:th.textContent.trim(),before:before,ascending:up,descending:down,
              aria:th.getAttribute("aria-sort")};
  }
  var text=document.body.innerText,chars=[],seen={};
  for(var i=0;i<text.length;i++){var ch=text[i];
    if(ch>="\uac00"&&ch<="\ud7a3"&&!seen[ch]){seen[ch]=1;chars.push(ch);}}
  var fam=getComputedStyle(document.body).fontFamily;
  var none='"RA-no-such-font", monospace';
  document.fonts.load("40px "+fam,chars.join("")).then(function(){
    // A character drawn like the fallback's (a box: a font without Hangul draws every syllable the same) or
    // like another syllable is not drawn by a Hangul font.
    var page=chars.map(function(ch){return glyphs(fam,ch);}),bare=chars.map(function(ch){return glyphs(none,ch);});
    var distinct={};page.forEach(function(p){distinct[p.sig]=1;});
    out.hangul={chars:chars.length,sample:chars.slice(0,8).join(""),font:fam,
      boxes:chars.filter(function(ch,i){return page[i].sig===bare[i].sig||page[i].ink===0;}).join(""),
      distinct:Object.keys(distinct).length,
      fallback_distinct:Object.keys(bare.reduce(function(a,b){a[b.sig]=1;return a;},{})).length,
      loaded:document.fonts.check("40px "+fam,chars.join(""))};
    out.requests=performance.getEntriesByType("resource").map(function(e){return e.name;});
    out.violations=violations;
    var el=document.getElementById("selftest-result");el.textContent=JSON.stringify(out);
    el.setAttribute("data-done","1");
  });
}
document.addEventListener("DOMContentLoaded",function(){wire();if(location.hash==="#selftest")selftest();});
})();
"""
