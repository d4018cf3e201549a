"""Shared pieces of the test suite: the tiny training configuration, the PNG signature, issue 3's challenge table
and the headless-Chromium probe of the report and docs tests."""

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

# A 1-epoch run on the tiny synthetic benchmark: seconds on a CPU (used with load_config("quick", TINY)).
TINY = [
    "data.options.image_size=32",
    "data.options.per_group=8",
    "data.options.test_per_group=8",
    "data.batch_size=16",
    "model.width=8",
    "train.epochs=1",
    "train.device=cpu",
]
PNG = b"\x89PNG\r\n\x1a\n"

# Issue 3's challenge table, written out independently of ex2l_xai.data.challenges, so the tests check the
# package against the issue: {challenge: (train group g, test t, O2O filler)}.
CLASSES = ["bulldog", "dachshund", "labrador", "corgi"]
BGS = ["desert", "jungle", "dirt", "mountain", "snow", "beach"]

TABLE = {
    "o2o_easy": (["desert", "jungle", "dirt", "snow"], ["dirt", "snow", "desert", "jungle"], "beach"),
    "o2o_medium": (["mountain", "beach", "dirt", "jungle"], ["jungle", "dirt", "beach", "snow"], "desert"),
    "o2o_hard": (["jungle", "mountain", "snow", "desert"], ["mountain", "snow", "desert", "jungle"], "beach"),
    "m2m_easy": (["desert", "mountain", "dirt", "jungle"], ["dirt", "jungle", "mountain", "desert"], None),
    "m2m_medium": (["beach", "snow", "mountain", "desert"], ["desert", "mountain", "beach", "snow"], None),
    "m2m_hard": (["dirt", "jungle", "snow", "beach"], ["snow", "beach", "dirt", "jungle"], None),
}


def chromium() -> str | None:
    """The first Chromium or Chrome binary on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_probe(url: str, probe_id: str, tmp_path: Path, profile: str = "profile") -> dict[str, Any]:
    """Load ``url`` in headless Chromium (no network services, its own profile under ``tmp_path``), dump the DOM
    after the load event and return the JSON a probe script wrote into ``<pre id=probe_id>``."""
    cmd = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-extensions", f"--user-data-dir={tmp_path / profile}", "--virtual-time-budget=10000",
        "--dump-dom", url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    m = re.search(rf'<pre id="{probe_id}">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"no probe output from {url} (rc {proc.returncode}): {proc.stderr[-800:]}"
    return json.loads(html.unescape(m.group(1)))


def tiny_run(base: Path, algorithm: str, seed: int = 0) -> Path:
    """The 1-epoch run of ``algorithm`` (and ``seed``) on the tiny synthetic benchmark under ``base`` (the analysis
    tests share ``<basetemp>/analysis_runs``: a folder marked done is not retrained)."""
    from ex2l_xai.config import load_config
    from ex2l_xai.train import train

    run = base / (algorithm if seed == 0 else f"{algorithm}_seed{seed}")
    train(load_config("quick", [*TINY, f"algorithm.name={algorithm}", f"seed={seed}"]), run, quiet=True)
    return run


def write_png(path: Path, chw: Any) -> None:
    """Save a (3, H, W) array in [0, 1] as an 8-bit PNG (parents created)."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.transpose(np.asarray(chw), (1, 2, 0)) * 255).astype(np.uint8)).save(path)


def png_pixels(path: Path) -> Any:
    """The (H, W, 4) uint8 pixels of a PNG file (its signature checked first)."""
    import numpy as np
    from PIL import Image

    assert path.read_bytes()[:8] == PNG, f"{path} is not a PNG"
    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"))


def rendered(fig: Any) -> Any:
    """A matplotlib figure drawn by Agg, as the (H, W, 4) uint8 array its PNG must hold."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def same_picture(a: Any, b: Any) -> None:
    """Same size and the same picture (a redraw may move anti-aliased text edges by a level or a pixel)."""
    import numpy as np

    assert a.shape == b.shape
    diff = np.abs(a.astype(int) - b.astype(int))
    assert (diff == 0).mean() > 0.95 and diff.mean() < 2.0


def drawn(pixels: Any, min_colours: int = 64) -> None:
    """A picture, not a blank canvas: at least ``min_colours`` distinct colours and under 97 % of one colour."""
    import numpy as np

    flat = pixels.reshape(-1, pixels.shape[-1])
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    assert len(colours) >= min_colours, f"only {len(colours)} colours"
    assert counts.max() / len(flat) < 0.97, "almost a single colour"
