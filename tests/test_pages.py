"""report.html and demo.html in a real headless Chromium: they load from file:// with no console
error and no network request, every image decodes, the numbers shown are results.csv's, and
each test saves a 1280x800 screenshot (into $FEDSIM_SCREENSHOTS when set)."""

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from fedsim.config import RunConfig
from fedsim.pages import write_page
from fedsim.runner import run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium on PATH: .ci/run installs Debian's chromium package")
        pytest.skip("no chromium on PATH (apt-get install chromium) to test the pages in a real browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def open_page(browser, path: Path, shot: str, tmp_path: Path):
    """Load a page from disk; returns it with the console errors and outside requests it made."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    folder = Path(os.environ.get("FEDSIM_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / shot))
    assert (folder / shot).stat().st_size > 10_000
    return page, errors, requests


def all_images_decode(page) -> bool:
    return page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pages") / "run"
    cfg = RunConfig(clients=3, model="lenet", peft="full", attack="dlg", attack_iters=3, defense="dp",
                    dp_noise=0.5, engine="inprocess", out=str(out))
    return run(cfg, console=Console(quiet=True))


def test_a_run_page_shows_what_results_csv_holds(browser, lenet_run, tmp_path):
    result = lenet_run
    assert result.report == result.out / "report.html" and (result.out / "reconstructions.png").exists()
    page, errors, requests = open_page(browser, result.report, "run.png", tmp_path)
    assert errors == [] and requests == []
    assert all_images_decode(page) and len(page.query_selector_all("figure img")) == 3
    results = pd.read_csv(result.out / "results.csv")
    shown = page.inner_text("#summary td[data-metric='PSNR dB']")
    assert shown == f"{results['psnr'].median():.1f}"
    assert page.inner_text("#summary td[data-metric='labels']") == f"{results['label_acc'].median():.0%}"
    for _, row in results.iterrows():  # every client's caption carries its own PSNR
        caption = page.inner_text(f"figure[data-client='{int(row['client'])}'] figcaption")
        assert f"PSNR dB {row['psnr']:.1f}" in caption
    assert "ε" in page.inner_text("p.lead")  # DP's epsilon in the setting's paragraph
    assert result.report.stat().st_size < 5_000_000


def test_a_sweep_page_links_every_trial(browser, lenet_run, tmp_path):
    """A sweep directory as fedsim sweep leaves it (results.parquet, trials/<id>/), two trials."""
    sweep = tmp_path / "sweep"
    rows = []
    for tid, defense in (("aaa", "none"), ("bbb", "dp")):
        shutil.copytree(lenet_run.out, sweep / "trials" / tid)
        frame = pd.read_csv(lenet_run.out / "results.csv").assign(trial_id=tid, trial_status="ok", defense=defense,
                                                                   accuracy_final=0.5)
        rows.append(frame)
    pd.concat(rows).to_parquet(sweep / "results.parquet")
    page_path = write_page(sweep)
    page, errors, requests = open_page(browser, page_path, "sweep.png", tmp_path)
    assert errors == [] and requests == [] and all_images_decode(page)
    links = [a.get_attribute("href") for a in page.query_selector_all("#trials a")]
    assert links == ["trials/aaa/report.html", "trials/bbb/report.html"]
    assert all((sweep / link).exists() for link in links)


@pytest.mark.slow
def test_the_demo_page_tells_the_story(browser, tmp_path):
    from fedsim.demo import PANELS, run_demo

    page_path = run_demo(tmp_path / "demo", Console(quiet=True))
    page, errors, requests = open_page(browser, page_path, "demo.png", tmp_path)
    assert errors == [] and requests == [] and all_images_decode(page)
    assert len(page.query_selector_all("#tradeoff tr")) == 1 + len(PANELS)
    assert "The trade-off" in page.inner_text("body")


def test_fedsim_report_rebuilds_the_page_of_an_older_run(lenet_run, tmp_path):
    """A run written before report.html existed, with a format-1 observation file."""
    import torch

    old = tmp_path / "old"
    shutil.copytree(lenet_run.out, old)
    (old / "report.html").unlink()
    (old / "timings.json").unlink()
    blob = torch.load(old / "observations" / "round1_client0.pt", weights_only=True)
    torch.save({**blob, "format": 1}, old / "observations" / "round1_client0.pt")
    from typer.testing import CliRunner

    from fedsim.cli import app

    result = CliRunner().invoke(app, ["report", str(old)])
    assert result.exit_code == 0, result.output
    page = (old / "report.html").read_text()
    numbers = sum(t.numel() for t in blob["update"].values())
    assert f"shared {numbers:,} numbers" in page and "Where the time went" not in page
    assert CliRunner().invoke(app, ["report", str(tmp_path / "nothing")]).exit_code == 2


def test_the_information_budget_says_whether_the_update_can_pin_the_embeddings():
    import pandas as pd

    from fedsim.report import budget_line

    rows = pd.DataFrame([{"batch_size": 8, "update_numbers": 256, "unknowns": 512},
                         {"batch_size": 8, "update_numbers": 256, "unknowns": 512}])
    line = budget_line(rows)
    assert "256 numbers for 512 unknowns" in line and "0.5 per unknown" in line and "under-determined" in line
    assert "under" not in budget_line(rows.assign(update_numbers=2048))
    assert budget_line(pd.DataFrame([{"batch_size": 1, "psnr": 30.0}])) is None  # attacks that report none
