"""MLflow's UI as a researcher reads it, in a real browser: Debian's Chromium, headless, driven
by playwright, against ``mlflow ui`` on 127.0.0.1 over a store this module makes with a tiny
sweep and a quick study. The links followed are the ones the commands print.

Screenshots go to the pytest temporary directory (``ui-screenshots*``; the path is printed).
Waits are on elements, never on the network going idle: the runs page polls the server.

Needs requirements-ci.txt (playwright) and Debian's chromium, which .ci/run installs; playwright
is imported by the fixtures, so that the fast suite collects this module without it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO_ROOT, TRAIN
from mlflow.tracking import MlflowClient

from gradalign.schema import Metric, Stage, Tag
from gradalign.tracking import labels

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"  # Debian's (apt-get install chromium); playwright's own is not used
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
SERVER_START_S = 240  # mlflow ui answers /health after 20-50 s on the loaded 2-core machine
TIMEOUT_MS = 60_000  # for one element to appear (plotly draws late on a busy machine)
# Without these, MLflow's assistant panel opens on a first visit and covers the page.
NO_ASSISTANT = (
    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
    "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def printed_link(text: str, after: str) -> str:
    """The first URL printed after ``after`` in ``text``."""
    match = re.search(re.escape(after) + r"\s*(http\S+)", text)
    assert match, f"no link after {after!r} in:\n{text[-3000:]}"
    return match[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny):
    """The store: a 3-trial sweep of gao (experiment gradient-alignment) and a quick study
    (experiment gradient-alignment-quick), what the commands printed, and the UI's address
    (the commands are told it, so that their links point at the server started below)."""
    root = tmp_path_factory.mktemp("ui-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    base = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cache = next(o for o in tiny if o.startswith("paths.data_cache="))
    common = [f"paths.outputs={root / 'out'}", f"tracking.ui_url={base}", cache]
    started = time.perf_counter()
    sweep = subprocess.run(
        [*TRAIN, "-m", "optimizer=gao", "hydra.sweeper.n_trials=3", *tiny, *common],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    study = subprocess.run(
        [sys.executable, str(REPO_ROOT / "study.py"), "--quick", "--", *common],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert study.returncode == 0, study.stderr[-3000:]
    print(f"\n[ui] store made in {time.perf_counter() - started:.0f} s")
    return {"uri": uri, "base": base, "sweep": sweep.stdout, "study": study.stderr}


@pytest.fixture(scope="module")
def server(made, tmp_path_factory):
    """``mlflow ui`` on the store, at the address the commands were told."""
    port = made["base"].rsplit(":", 1)[1]
    log = tmp_path_factory.mktemp("ui-server") / "mlflow-ui.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # starts twice as fast
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", made["uri"]]
            + ["--host", "127.0.0.1", "--port", port, "--workers", "1"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while True:
            assert process.poll() is None, f"mlflow ui exited: {log.read_text()[-2000:]}"
            assert time.perf_counter() - started < SERVER_START_S, "mlflow ui did not start"
            try:
                urllib.request.urlopen(f"{made['base']}/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        print(f"[ui] mlflow ui answered after {time.perf_counter() - started:.0f} s")
        yield made["base"]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ui-screenshots")
    print(f"[ui] screenshots in {folder}")
    return folder


@pytest.fixture(scope="module")
def expect():
    """playwright's expect, waiting up to TIMEOUT_MS for what it asserts."""
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    return expect


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium (.ci/run)"
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    """A first-time visitor's tab (no local storage), wide enough that the runs table draws
    all its columns."""
    context = browser.new_context(viewport={"width": 2000, "height": 1200})
    context.set_default_timeout(TIMEOUT_MS)
    context.add_init_script(NO_ASSISTANT)
    tab = context.new_page()
    yield tab
    context.close()


@pytest.fixture(scope="module")
def store(made):
    """What the store holds, read with MLflow's client: the sweep's parent and best trial, the
    report run."""
    client = MlflowClient(made["uri"])
    sweeps = client.get_experiment_by_name("gradient-alignment").experiment_id
    quick = client.get_experiment_by_name("gradient-alignment-quick").experiment_id
    [parent] = client.search_runs([sweeps], f"tags.{Tag.STAGE} = '{Stage.SWEEP_PARENT}'")
    [report] = client.search_runs([quick], f"tags.{Tag.STAGE} = '{Stage.REPORT}'")
    return {"sweeps": sweeps, "parent": parent, "report": report}


def row(page, run_id):
    return page.locator(f'.ag-center-cols-container [role=row][row-id="{run_id}"]')


def loaded(expect, page, image) -> None:
    """Wait until ``image`` (a locator) has been drawn: loaded, with a width."""
    expect(image).to_be_visible()
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=image.element_handle())


def test_the_link_a_sweep_prints_lists_its_trials_best_first(page, expect, made, store, shots):
    page.goto(printed_link(made["sweep"], "its trials at"))
    best_id = store["parent"].data.tags[Tag.BEST_RUN_ID]
    best = row(page, best_id)
    expect(best).to_be_visible()
    first = page.locator('.ag-center-cols-container [role=row][row-index="0"]')
    assert first.get_attribute("row-id") == best_id
    objective = best.locator(f'[col-id="{labels.column("metrics", Metric.OBJECTIVE)}"]')
    best_objective = store["parent"].data.metrics[Metric.BEST_OBJECTIVE]
    assert float(objective.inner_text()) == pytest.approx(best_objective)
    lr = best.locator(f'[col-id="{labels.column("params", "optimizer.lr")}"]')
    assert float(lr.inner_text()) == pytest.approx(
        float(store["parent"].data.tags["best.optimizer.lr"])
    )
    dataset = best.locator(f'[col-id="{labels.column("attributes", "Dataset")}"]')
    expect(dataset).to_contain_text("mnist1d (")
    expect(page.get_by_text("3 matching runs")).to_be_visible()
    page.screenshot(path=shots / "01_sweep_trials_by_objective.png")


def test_the_runs_page_lists_the_sweep_parent_with_its_best_objective(
    page, expect, server, store, shots
):
    parent = store["parent"]
    best = parent.data.metrics[Metric.BEST_OBJECTIVE]
    page.goto(labels.runs_link(server, store["sweeps"]))  # what a sweep's end line links to
    name = page.locator(f'.ag-pinned-left-cols-container [row-id="{parent.info.run_id}"]')
    expect(name).to_contain_text(f"gao sweep {parent.info.run_name.split()[2]}")
    assert f": best {best:.4g} (lr=" in name.inner_text()
    page.screenshot(path=shots / "02_runs_page.png")
    page.goto(labels.runs_link(server, store["sweeps"], labels.SWEEPS_VIEW))
    cell = row(page, parent.info.run_id).locator(
        f'[col-id="{labels.column("metrics", Metric.BEST_OBJECTIVE)}"]'
    )
    expect(cell).to_be_visible()
    assert float(cell.inner_text()) == pytest.approx(best)
    description = row(page, parent.info.run_id).locator(
        f'[col-id="{labels.column("attributes", "Description")}"]'
    )
    expect(description).to_contain_text(f"best objective {best:.4f} at trial")
    page.screenshot(path=shots / "03_sweeps_view.png")


def test_the_sweep_parents_page_shows_its_best_trial_and_history(page, expect, made, store, shots):
    parent = store["parent"]
    page.goto(printed_link(made["sweep"], "MLflow parent"))
    best = parent.data.metrics[Metric.BEST_OBJECTIVE]
    expect(page.get_by_text(f"best objective {best:.4f} at trial")).to_be_visible()
    page.get_by_text("Show more").click()
    loaded(expect, page, page.locator('img[src*="optimization_history.png"]'))
    page.screenshot(path=shots / "04_sweep_parent.png", full_page=True)
    best_id = parent.data.tags[Tag.BEST_RUN_ID]
    link = page.get_by_role("link", name="the trial's run")
    href = labels.run_link("", store["sweeps"], best_id)
    expect(link).to_have_attribute("href", href)
    page.goto(f"{made['base']}/{href}")  # where the click leads (the UI's own router)
    best = MlflowClient(made["uri"]).get_run(best_id).info.run_name
    expect(page.get_by_text(best).first).to_be_visible()


def test_the_report_runs_page_shows_the_verdict_and_the_figure(page, expect, made, store, shots):
    verdict = store["report"].data.tags[f"{Tag.VERDICT_PREFIX}gao"]
    page.goto(printed_link(made["study"], "MLflow: report"))
    expect(page.get_by_test_id("note-editor-preview-content").get_by_text(verdict)).to_be_visible()
    page.get_by_text("Show more").click()
    loaded(expect, page, page.locator('img[src*="convergence_comparison.png"]'))
    page.screenshot(path=shots / "05_report_run.png", full_page=True)


def test_the_report_html_shows_the_verdict_and_the_figure(page, expect, server, store, shots):
    report = store["report"]
    artifacts = labels.run_link(server, report.info.experiment_id, report.info.run_id)
    page.goto(artifacts.replace("?", "/artifacts?"))
    page.locator('[data-testid="artifact-tree-node"][artifact-name="report.html"]').click()
    frame = page.frame_locator("iframe.mlflow-html-iframe")
    verdict = report.data.tags[f"{Tag.VERDICT_PREFIX}gao"]
    expect(frame.get_by_text(verdict)).to_be_visible()
    figure = frame.locator('img[alt="convergence comparison"]')
    expect(figure).to_be_visible()
    assert figure.evaluate("i => i.complete && i.naturalWidth") > 0
    page.screenshot(path=shots / "06_report_html.png")


def test_the_final_runs_link_groups_them_by_optimizer_in_charts(page, expect, made, shots):
    page.goto(printed_link(made["study"], "its final runs by optimizer"))
    for group in ("Group: adam", "Group: gao"):
        expect(page.get_by_text(group).first).to_be_visible()
    expect(page.get_by_text("4 matching runs")).to_be_visible()
    expect(page.locator(".js-plotly-plot").first).to_be_visible()
    sections = re.findall(r"^(\S[^\n]*)\n\((\d+)\)$", page.inner_text("body"), flags=re.M)
    assert [name for name, _ in sections][:2] == ["accuracy", "loss"], sections
    page.screenshot(path=shots / "07_final_runs_by_optimizer.png")


def test_a_trials_charts_begin_with_its_curves(page, expect, server, store, shots):
    trial = store["parent"].data.tags[Tag.BEST_RUN_ID]
    link = labels.run_link(server, store["sweeps"], trial).replace("?", "/model-metrics?")
    page.goto(link)
    expect(page.locator(".js-plotly-plot").first).to_be_visible()
    sections = re.findall(r"^(\S[^\n]*)\n\((\d+)\)$", page.inner_text("body"), flags=re.M)
    # accuracy/{test,val}, loss/{test,train,val}, GAO's per-parameter scales, the summaries
    assert [name for name, _ in sections] == ["accuracy", "loss", "scale", "Model metrics"]
    assert sections[1] == ("loss", "3")
    page.screenshot(path=shots / "08_trial_charts.png")
