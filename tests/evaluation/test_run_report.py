"""report.html of a run (`tgrl_lib.evaluation.run_report`) and the blind prior it prints.

The page is rendered in headless Chromium (Debian `chromium`, installed by scripts/install-tools.sh): every
plot must load as an image with a size, and its pixels must show data (more than a blank canvas). A blank
PNG is the negative control of the pixel check.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from tgrl_lib.data.schema import Problem
from tgrl_lib.evaluation.blind_prior import blind_prior
from tgrl_lib.evaluation.run_report import RunSummary, render, write_run_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _results(acc: dict[str, float], grounding: dict[str, float]) -> dict:
    groups = {f: {"accuracy": a, "grounding": grounding[f], "count": 16.0} for f, a in acc.items()}
    overall = {"accuracy": sum(acc.values()) / len(acc), "grounding": 0.3, "count": 16.0 * len(acc)}
    return {"meta": {}, "benchmarks": {"synthetic": {"overall": overall, "groups": groups}}}


def _summary() -> RunSummary:
    history = [
        {"step": s, "reward/mean": 0.3 + 0.01 * s, "reward/accuracy": 0.25 + 0.01 * s} for s in range(1, 11)
    ]
    return RunSummary(
        name="tiny-cpu tgrl run-7",
        algorithm="tgrl",
        final=_results(
            {"count": 0.6, "color": 0.5, "shape": 0.4}, {"count": 0.5, "color": 0.4, "shape": 0.2}
        ),
        start=_results(
            {"count": 0.5, "color": 0.4, "shape": 0.3}, {"count": 0.4, "color": 0.3, "shape": 0.1}
        ),
        blind_prior={"accuracy": 0.31, "groups": {"count": 0.3, "color": 0.35, "shape": 0.28}},
        history=history,
        decision={"model_uri": "models:/tgrl-tiny/2", "promoted": True, "reason": "beats the start model"},
    )


def _plots(page: str) -> list[Image.Image]:
    data = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    return [Image.open(io.BytesIO(base64.b64decode(d))).convert("RGB") for d in data]


def shows_data(image: Image.Image) -> bool:
    """More than a blank canvas: a plot with axes, bars or points has many colours and non-white pixels."""
    colours = image.getcolors(maxcolors=1 << 16)
    n_colours = len(colours) if colours is not None else 1 << 16
    non_white = int((np.asarray(image) != 255).any(axis=-1).sum())
    return n_colours > 8 and non_white > 0.02 * image.width * image.height


def test_blank_png_is_not_data():  # negative control of the pixel check
    assert not shows_data(Image.new("RGB", (400, 300), "white"))


def test_page_names_the_run_and_shows_start_final_and_decision():
    page = render(_summary())
    assert "<title>tiny-cpu tgrl run-7: tgrl</title>" in page and "`" not in page
    assert "0.400 -&gt; 0.500" in page  # start -> final accuracy
    assert "blind prior" in page and "0.310" in page
    assert "promoted to @champion: beats the start model" in page
    plots = _plots(page)
    assert len(plots) == 3  # accuracy per family, accuracy vs grounding, training curves
    assert all(shows_data(p) for p in plots)


def test_sft_only_run_has_no_training_curve_but_the_other_plots():
    summary = _summary()
    summary.history = [{"step": 1, "loss/sft": 2.0}]
    summary.start = None
    assert len(_plots(render(summary))) == 2


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/install-tools.sh installs it)")
def test_report_renders_in_headless_chromium_with_non_empty_plots(tmp_path):
    page = write_run_report(_summary(), tmp_path / "report.html").read_text()
    probe = (  # after load, write each image's decoded size into the DOM, which --dump-dom prints
        "<script>window.addEventListener('load',()=>{const p=document.createElement('pre');p.id='probe';"
        "p.textContent=JSON.stringify([...document.images].map(i=>[i.complete,i.naturalWidth,i.naturalHeight]));"
        "document.body.appendChild(p);});</script>"
    )
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", probe + "</body>"))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [CHROMIUM, *flags, "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom)
    assert match, f"the page did not finish loading in Chromium: {dom[-500:]}"
    sizes = json.loads(match.group(1))
    assert len(sizes) == 3 and all(done and w > 100 and h > 100 for done, w, h in sizes)

    shot, url = tmp_path / "shot.png", (tmp_path / "report.html").as_uri()
    subprocess.run(
        [CHROMIUM, *flags, "--window-size=1200,2400", f"--screenshot={shot}", url],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    rendered = Image.open(shot).convert("RGB")
    assert shows_data(rendered)  # what a person sees: the table and the plots, not a blank page
    assert all(shows_data(p) for p in _plots(page))


def _problem(answer: str, family: str) -> Problem:
    return Problem(
        id=f"{family}-{answer}-{id(object())}", image="x.png", question="q", answer=answer,
        answer_type="integer", meta={"family": family},
    )  # fmt: skip


def test_blind_prior_is_the_train_splits_majority_answer_per_type():
    train = [_problem("2", "count")] * 3 + [_problem("3", "count")] + [_problem("red", "color")] * 2
    test = [
        _problem("2", "count"),
        _problem("3", "count"),
        _problem("red", "color"),
        _problem("blue", "shape"),
    ]
    prior = blind_prior(train, test)
    assert prior["groups"] == {"color": 1.0, "count": 0.5, "shape": 0.0}  # shape: unseen in train
    assert prior["accuracy"] == pytest.approx(2 / 4)
