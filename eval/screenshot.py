"""Screenshot an HTML report with headless Chromium (used by the report test and for the README picture).

    python -m eval.screenshot outputs/eval/report.html eval/report_screenshot.png [--width 1100 --height 1400]

Chromium runs with a fresh profile, no network services (`--disable-background-networking`, ...) and no
sandbox (CI runs as root). Found as `$CHROMIUM`, else `chromium` / `chromium-browser` / `google-chrome` on PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from modeling_moe.cli import CliArgumentParser, UsageError, check_output_dir, run_cli

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    """Path of a Chromium binary (`$CHROMIUM` first), or None when there is none."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(
    html_path: str | os.PathLike, png_path: str | os.PathLike, width: int = 1100, height: int = 1400, timeout: int = 120
) -> Path:
    """Render `html_path` in headless Chromium and save a `width` x `height` PNG to `png_path` (atomically).

    Raises:
        FileNotFoundError: no Chromium binary, or no HTML file. RuntimeError: Chromium wrote no screenshot.
    """
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError(f"no Chromium found (set $CHROMIUM or install one of {CHROMIUM_NAMES})")
    html_file = Path(html_path).resolve()
    if not html_file.is_file():
        raise FileNotFoundError(f"no HTML file at {html_file}")
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp_png = png.with_name(f".{png.stem}.{os.getpid()}.tmp.png")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            binary,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={tmp_png}",
            html_file.as_uri(),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if not tmp_png.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}")
    os.replace(tmp_png, png)
    return png


PROG = "python -m eval.screenshot"


def main(argv: list[str] | None = None) -> None:
    """CLI: screenshot an HTML file. A user error exits with status 2 and one line."""
    parser = CliArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=1400)
    parser.add_argument("--timeout", type=int, default=120, help="seconds Chromium may take")
    args = parser.parse(argv)
    for name in ("width", "height", "timeout"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.html.is_file():
        raise FileNotFoundError(f"html: no such file {str(args.html)!r}")
    if args.png.suffix.lower() != ".png":
        raise UsageError(f"png: the output must be a .png file, got {str(args.png)!r}")
    check_output_dir(args.png.parent, "png (its folder)")
    if find_chromium() is None:
        raise UsageError(f"no Chromium found (set $CHROMIUM or install one of {', '.join(CHROMIUM_NAMES)})")
    print(screenshot(args.html, args.png, args.width, args.height, args.timeout))


USER_ERRORS = ()

if __name__ == "__main__":
    run_cli(main, PROG, user_errors=USER_ERRORS)
