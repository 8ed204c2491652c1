"""Screenshot of a report.html as a user sees it: Debian's Chromium, headless, offline.

    python tools/report_screenshot.py RUN_DIR/report/report.html docs/img/report_lora_rank.png [--size 1400,1800]

The repository keeps the screenshot of the bundled lora_rank report (docs/img/report_lora_rank.png, README), made
with this script from `python -m rlhf_ablate sweep sweeps/lora_rank.yaml`. The PNG is reduced to 256 colours
(Pillow, a matplotlib dependency) to stay small.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
         "--hide-scrollbars", "--disable-dev-shm-usage", "--virtual-time-budget=5000"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", default="1400,1800", help="window width,height in pixels")
    args = ap.parse_args()
    exe = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if exe is None:
        print("no Chromium: apt-get install chromium", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.png"
        subprocess.run([exe, *FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={args.size}",
                        f"--screenshot={raw}", args.page.resolve().as_uri()], check=True, capture_output=True,
                       timeout=120)
        from PIL import Image

        img = Image.open(raw).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        img.save(args.out, optimize=True)
    print(f"{args.out}: {args.out.stat().st_size // 1024} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
