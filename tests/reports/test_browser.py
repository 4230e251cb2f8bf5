"""The HTML report in headless Chromium: every figure decodes, the headline shows, user strings stay text.

Needs Debian's ``chromium`` (``scripts/env.sh`` installs it when it can); skips with the reason otherwise.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from robustness_diag.analyses import correlate as C
from robustness_diag.analyses import stats as S
from robustness_diag.reports.correlate_report import rerender

CHECKER = """<script id="rd-check">
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const scripts = document.querySelectorAll('script').length;
  const div = document.createElement('div');
  div.id = 'rd-result';
  div.textContent = `images=${imgs.length} broken=${broken} scripts=${scripts}`;
  document.body.appendChild(div);
});
</script>"""


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium; scripts/env.sh tries this as root)")


def test_report_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    rng = np.random.default_rng(0)
    score = rng.gamma(3.0, size=400)
    obs = S.Observations(score, rng.binomial(4, np.clip(score / 12, 0, 1)), 4, np.arange(400) // 40)
    evil = '<script>document.title="pwned"</script>'
    model = C.ModelResult(f"affine {evil}", obs, image_names=[f"{evil}.png"] * 10,
                          examples=[{"title": evil, "lr": np.full((4, 4, 3), 0.5), "mask": np.eye(16)}])
    C.run(C.CorrelateConfig(out=str(tmp_path), n_resamples=50, results=[model]), render=rerender)
    html = (tmp_path / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", CHECKER + "</body>"))
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                           "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    m = re.search(r"images=(\d+) broken=(\d+) scripts=(\d+)", dom)
    assert m, f"checker did not run; chromium said: {proc.stderr[-2000:]}"
    images, broken, scripts = map(int, m.groups())
    assert images >= 5 and broken == 0
    assert scripts == 1                                   # only the probe: the file name's <script> is text
    assert "pwned" not in dom.split("<body")[0]           # the title was not rewritten
    assert "&lt;script&gt;document.title" in dom
    assert re.search(r"AUROC[^<]*</td>\s*<td class=\"metric\">0\.\d+ \[0\.\d+, 0\.\d+\]", dom)
