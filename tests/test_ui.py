"""MLflow's UI and optuna-dashboard as a researcher reads them, in a real browser: Debian's
Chromium, headless, driven by playwright, against ``python -m gradalign.ui`` (the README's
command) on 127.0.0.1 over a store this module makes with a 12-trial sweep and a quick study.
The links followed are the ones the commands print; each view is checked for the text a
researcher reads in it.

Screenshots go to the pytest temporary directory (``ui-screenshots*``; the path is printed),
one per view. Waits are on elements, never on the network going idle: the runs page polls the
server.

Needs requirements-ci.txt (playwright) and Debian's chromium, which .ci/run installs; playwright
is imported by the fixtures, so that the fast suite collects this module without it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO_ROOT, TRAIN, free_port
from mlflow.tracking import MlflowClient

from gradalign.schema import Metric, Stage, Tag
from gradalign.tracking import labels

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"  # Debian's (apt-get install chromium); playwright's own is not used
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
SERVER_START_S = 240  # gradalign.ui answers in 5-20 s on the loaded 2-core machine
TRIALS = 12  # more than the 10 runs MLflow's charts draw by default
TIMEOUT_MS = 60_000  # for one element to appear (plotly draws late on a busy machine)
# Without these, MLflow's assistant panel opens on a first visit and covers the page.
NO_ASSISTANT = (
    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
    "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
)


def printed_link(text: str, after: str) -> str:
    """The first URL printed after ``after`` in ``text``."""
    match = re.search(re.escape(after) + r"\s*(http\S+)", text)
    assert match, f"no link after {after!r} in:\n{text[-3000:]}"
    return match[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny):
    """The store: a 12-trial sweep of gao (experiment gradient-alignment) and a quick study
    (experiment gradient-alignment-quick, its sweeps stored in out/studies/optuna.db), what
    the commands printed, and the UI's address (the commands are told it, so that their links
    point at the server started below)."""
    root = tmp_path_factory.mktemp("ui-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    base = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cache = next(o for o in tiny if o.startswith("paths.data_cache="))
    common = [f"paths.outputs={root / 'out'}", f"tracking.ui_url={base}", cache]
    started = time.perf_counter()
    sweep = subprocess.run(
        [*TRAIN, "-m", "optimizer=gao", f"hydra.sweeper.n_trials={TRIALS}", *tiny, *common],
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
    # the same comparison with a verdict: the quick study is a smoke run (numbers, no verdict)
    quick = ["tracking.experiment=gradient-alignment-quick", "trainer.epochs=3"]
    quick += ["dataset.generation.num_samples=1000"]  # conf/study/default.yaml's quick
    verdict = subprocess.run(
        [sys.executable, str(REPO_ROOT / "report.py"), "--seeds", "1", "2", "--final-epochs"]
        + ["5", "--min-pairs", "2", "--name", "verdict", "--", *quick, *common],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert verdict.returncode == 0, verdict.stderr[-3000:]
    assert "0 final run(s) to train, 4 reused" in verdict.stderr
    print(f"\n[ui] store made in {time.perf_counter() - started:.0f} s")
    storage = f"sqlite:///{root / 'out' / 'studies' / 'optuna.db'}"
    return {
        **{"uri": uri, "base": base, "storage": storage},
        "sweep": sweep.stdout,
        "study": study.stderr,
    }


def serve(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """``command`` started in a session of its own, its output to ``log``."""
    with open(log, "w") as output:
        return subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO_ROOT,
        )


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def printed_links(text: str) -> dict[str, str]:
    """Experiment name -> link, from what python -m gradalign.ui printed."""
    return dict(re.findall(r"^  (\S+): (http\S+)$", text, flags=re.M))


@pytest.fixture(scope="module")
def server(made, tmp_path_factory):
    """``python -m gradalign.ui`` on the store, at the address the commands were told; what it
    printed: the links to each experiment's runs."""
    port = made["base"].rsplit(":", 1)[1]
    log = tmp_path_factory.mktemp("ui-server") / "gradalign-ui.log"
    started = time.perf_counter()
    command = [sys.executable, "-m", "gradalign.ui", "--port", port]
    process = serve(command, log, {"MLFLOW_TRACKING_URI": made["uri"]})
    try:
        while "The runs of:" not in log.read_text():
            assert process.poll() is None, f"gradalign.ui exited: {log.read_text()[-2000:]}"
            assert time.perf_counter() - started < SERVER_START_S, "mlflow ui did not start"
            time.sleep(0.5)
        time.sleep(1)  # the links follow the line
        print(f"[ui] python -m gradalign.ui answered after {time.perf_counter() - started:.0f} s")
        yield {"base": made["base"], "printed": log.read_text()}
    finally:
        stop(process)


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
    """What the store holds, read with MLflow's client: the sweep's parent and trials, the
    report run."""
    client = MlflowClient(made["uri"])
    sweeps = client.get_experiment_by_name("gradient-alignment").experiment_id
    quick = client.get_experiment_by_name("gradient-alignment-quick").experiment_id
    [parent] = client.search_runs([sweeps], f"tags.{Tag.STAGE} = '{Stage.SWEEP_PARENT}'")
    trials = client.search_runs([sweeps], f"tags.{Tag.STAGE} = '{Stage.SWEEP}'")
    reports = client.search_runs([quick], f"tags.{Tag.STAGE} = '{Stage.REPORT}'")
    [report] = [r for r in reports if r.data.tags[Tag.REPORT_NAME] != "verdict"]
    [verdict] = [r for r in reports if r.data.tags[Tag.REPORT_NAME] == "verdict"]
    return {
        **{"sweeps": sweeps, "quick": quick, "parent": parent, "trials": trials},
        **{"report": report, "verdict": verdict},
    }


def row(page, run_id):
    return page.locator(f'.ag-center-cols-container [role=row][row-id="{run_id}"]')


def cell(page, run_id, column):
    return row(page, run_id).locator(f'[col-id="{column}"]')


def name_cell(page, run_id):
    """The run's cell of the Run Name column (pinned left): its [+], its name."""
    return page.locator(
        f'.ag-pinned-left-cols-container [row-id="{run_id}"] [col-id="{labels.NAME_COLUMN}"]'
    )


def headers(page) -> list[str]:
    """The runs table's column headers, as shown."""
    return page.locator(".ag-header-cell[col-id]").evaluate_all(
        "cells => cells.map(c => c.getAttribute('col-id'))"
    )


def whole(locator) -> bool:
    """Whether ``locator``'s text is shown whole (not cut with an ellipsis)."""
    return locator.evaluate("e => e.scrollWidth <= e.clientWidth + 1")


def section_names(page) -> list[str]:
    """The chart view's section titles, in order ("loss (3)" -> "loss")."""
    return [n for n, _ in re.findall(r"^(\S[^\n]*)\n\((\d+)\)$", page.inner_text("body"), re.M)]


def loaded(expect, page, image) -> None:
    """Wait until ``image`` (a locator) has been drawn: loaded, with a width."""
    expect(image).to_be_visible()
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=image.element_handle())


def test_the_ui_command_links_each_experiment_to_all_its_runs(page, expect, server, store, shots):
    """The README's command prints, per experiment, the link that opens its runs (not MLflow's
    GenAI overview): each run with its objective, best val loss, searched values, optimizer;
    a sweep's name, which carries its best values, shown whole; its trials under its [+]."""
    links = printed_links(server["printed"])
    assert set(links) == {"gradient-alignment", "gradient-alignment-quick"}
    page.goto(links["gradient-alignment"])
    parent = store["parent"]
    name = name_cell(page, parent.info.run_id).locator("a span")
    expect(name).to_have_text(parent.info.run_name)
    assert ": best " in parent.info.run_name and "beta=" in parent.info.run_name
    assert whole(name), parent.info.run_name
    expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    shown = headers(page)
    for column in (
        labels.column("tags", Tag.OPTIMIZER),
        labels.column("metrics", Metric.OBJECTIVE),
        labels.column("metrics", Metric.BEST_OBJECTIVE),
        labels.column("metrics", Metric.BEST_VAL_LOSS),
        labels.column("params", "optimizer.lr"),
        labels.column("params", "optimizer.beta"),
    ):
        assert column in shown, (column, shown)
    best = parent.data.metrics[Metric.BEST_OBJECTIVE]
    best_cell = cell(page, parent.info.run_id, labels.column("metrics", Metric.BEST_OBJECTIVE))
    assert float(best_cell.inner_text()) == pytest.approx(best, rel=1e-3)
    expect(cell(page, parent.info.run_id, labels.column("tags", Tag.OPTIMIZER))).to_have_text("gao")
    name_cell(page, parent.info.run_id).locator("button").click()  # the [+]: its trials
    trial = store["trials"][0]
    objective = cell(page, trial.info.run_id, labels.column("metrics", Metric.OBJECTIVE))
    expect(objective).to_be_visible()
    assert float(objective.inner_text()) == pytest.approx(
        trial.data.metrics[Metric.OBJECTIVE], rel=1e-3
    )
    lr = cell(page, trial.info.run_id, labels.column("params", "optimizer.lr"))
    assert float(lr.inner_text()) == pytest.approx(
        float(trial.data.params["optimizer.lr"]), rel=1e-3
    )
    page.screenshot(path=shots / "01_all_runs.png")


def test_the_link_a_sweep_prints_lists_its_trials_best_first(page, expect, made, store, shots):
    page.goto(printed_link(made["sweep"], "its trials at"))
    best_id = store["parent"].data.tags[Tag.BEST_RUN_ID]
    best = row(page, best_id)
    expect(best).to_be_visible()
    first = page.locator('.ag-center-cols-container [role=row][row-index="0"]')
    assert first.get_attribute("row-id") == best_id
    objective = cell(page, best_id, labels.column("metrics", Metric.OBJECTIVE))
    best_objective = store["parent"].data.metrics[Metric.BEST_OBJECTIVE]
    assert float(objective.inner_text()) == pytest.approx(best_objective)
    lr = cell(page, best_id, labels.column("params", "optimizer.lr"))
    assert float(lr.inner_text()) == pytest.approx(
        float(store["parent"].data.tags["best.optimizer.lr"])
    )
    expect(cell(page, best_id, labels.column("attributes", "Dataset"))).to_contain_text("mnist1d (")
    expect(page.get_by_text(f"{TRIALS} matching runs")).to_be_visible()
    page.screenshot(path=shots / "02_sweep_trials_by_objective.png")


def test_the_sweep_s_chart_view_draws_every_trial_in_parallel_coordinates(
    page, expect, made, shots
):
    """Its chart view opens on beta and lr against the objective, a line per trial: all 12,
    where MLflow's charts draw only the first 10 runs unless told otherwise ("Showing only
    visible runs", 2 runs' eyes closed)."""
    page.goto(printed_link(made["sweep"], "its trials at") + "&compareRunsMode=CHART")
    expect(page.get_by_text("Showing all runs")).to_be_visible()
    chart = page.locator(".parcoords")
    expect(chart).to_be_visible()
    assert section_names(page)[0] == "objective by searched values"
    for axis in ("optimizer.beta", "optimizer.lr", "objective"):
        expect(chart.locator("svg .dimension").get_by_text(axis, exact=True)).to_be_visible()
    visible = page.locator("input.is-visibility-toggle-checkbox")
    expect(visible).to_have_count(TRIALS)
    assert visible.evaluate_all("boxes => boxes.filter(b => b.checked).length") == TRIALS
    page.screenshot(path=shots / "03_sweep_parallel_coordinates.png")


def test_the_sweeps_view_lists_each_sweep_with_its_best_objective(
    page, expect, server, store, shots
):
    parent = store["parent"]
    best = parent.data.metrics[Metric.BEST_OBJECTIVE]
    page.goto(labels.runs_link(server["base"], store["sweeps"], labels.SWEEPS_VIEW))
    best_cell = cell(page, parent.info.run_id, labels.column("metrics", Metric.BEST_OBJECTIVE))
    expect(best_cell).to_be_visible()
    assert float(best_cell.inner_text()) == pytest.approx(best)
    name = name_cell(page, parent.info.run_id).locator("a span")
    expect(name).to_contain_text(f": best {best:.4g} (lr=")
    assert whole(name)
    complete = cell(page, parent.info.run_id, labels.column("metrics", Metric.TRIALS_COMPLETE))
    assert int(complete.inner_text()) == parent.data.metrics[Metric.TRIALS_COMPLETE]
    page.screenshot(path=shots / "04_sweeps_view.png")


def test_the_sweep_parents_page_shows_its_best_trial_and_history(page, expect, made, store, shots):
    parent = store["parent"]
    page.goto(printed_link(made["sweep"], "MLflow parent"))
    best = parent.data.metrics[Metric.BEST_OBJECTIVE]
    expect(page.get_by_text(f"best objective {best:.4f} at trial")).to_be_visible()
    page.get_by_text("Show more").click()
    loaded(expect, page, page.locator('img[src*="optimization_history.png"]'))
    page.screenshot(path=shots / "05_sweep_parent.png", full_page=True)
    best_id = parent.data.tags[Tag.BEST_RUN_ID]
    link = page.get_by_role("link", name="the trial's run")
    href = labels.run_link("", store["sweeps"], best_id)
    expect(link).to_have_attribute("href", href)
    page.goto(f"{made['base']}/{href}")  # where the click leads (the UI's own router)
    best = MlflowClient(made["uri"]).get_run(best_id).info.run_name
    expect(page.get_by_text(best).first).to_be_visible()


def test_the_reports_view_shows_each_verdict_s_effect_ci_and_p(page, expect, server, store, shots):
    """A report's row: the effect (mean paired difference), its CI and p, and the verdict; a
    smoke run's row the effect and its words only, as its report says."""
    page.goto(labels.runs_link(server["base"], store["quick"], labels.REPORTS_VIEW))
    report = store["verdict"]
    rid, metrics, tags = report.info.run_id, report.data.metrics, report.data.tags
    effect = cell(page, rid, labels.column("metrics", "gao/best_val_loss/mean_diff"))
    expect(effect).to_be_visible()
    assert float(effect.inner_text()) == pytest.approx(
        metrics["gao/best_val_loss/mean_diff"], rel=1e-3
    )
    assert re.fullmatch(r"\[[-+][\d.e-]+, [-+][\d.e-]+\] \(95%\)", tags["ci/gao"])
    expect(cell(page, rid, labels.column("tags", "ci/gao"))).to_have_text(tags["ci/gao"])
    assert f"95% CI {tags['ci/gao'].removesuffix(' (95%)')}" in tags["verdict/gao"]
    p_value = cell(page, rid, labels.column("metrics", "gao/best_val_loss/p_t"))
    assert float(p_value.inner_text()) == pytest.approx(metrics["gao/best_val_loss/p_t"], rel=1e-2)
    verdict = cell(page, rid, labels.column("tags", "verdict/gao"))
    expect(verdict).to_contain_text(tags["verdict/gao"][:60])
    assert tags["verdict/gao"].startswith("No significant difference in min val loss")
    for column in ("gao/best_val_loss/mean_diff", "ci/gao", "gao/best_val_loss/p_t"):
        header = page.locator(f'.ag-header-cell[col-id$="`{column}`"]')
        expect(header).to_have_text(column)
    smoke = store["report"]
    sid = smoke.info.run_id
    assert smoke.data.tags[Tag.SMOKE_RUN] == "true"
    expect(cell(page, sid, labels.column("tags", Tag.SMOKE_RUN))).to_have_text("true")
    expect(cell(page, sid, labels.column("tags", "verdict/gao"))).to_contain_text("SMOKE RUN")
    smoke_effect = cell(page, sid, labels.column("metrics", "gao/best_val_loss/mean_diff"))
    assert float(smoke_effect.inner_text()) == pytest.approx(
        smoke.data.metrics["gao/best_val_loss/mean_diff"], rel=1e-3
    )
    for column in (
        labels.column("tags", "ci/gao"),
        labels.column("metrics", "gao/best_val_loss/p_t"),
    ):
        expect(cell(page, sid, column)).to_have_text("-")
    page.screenshot(path=shots / "06_reports_view.png")


def test_the_report_runs_page_shows_the_verdict_and_the_figure(page, expect, made, store, shots):
    verdict = store["report"].data.tags[f"{Tag.VERDICT_PREFIX}gao"]
    page.goto(printed_link(made["study"], "MLflow: report"))
    preview = page.get_by_test_id("note-editor-preview-content")
    expect(preview.get_by_text(verdict)).to_be_visible()
    assert "**" not in preview.first.inner_text()
    page.get_by_text("Show more").click()
    loaded(expect, page, page.locator('img[src*="convergence_comparison.png"]'))
    page.screenshot(path=shots / "07_report_run.png", full_page=True)


def test_the_report_html_shows_the_verdict_and_the_figure(page, expect, server, store, shots):
    report = store["report"]
    artifacts = labels.run_link(server["base"], report.info.experiment_id, report.info.run_id)
    page.goto(artifacts.replace("?", "/artifacts?"))
    page.locator('[data-testid="artifact-tree-node"][artifact-name="report.html"]').click()
    frame = page.frame_locator("iframe.mlflow-html-iframe")
    verdict = report.data.tags[f"{Tag.VERDICT_PREFIX}gao"]
    expect(frame.get_by_text(verdict)).to_be_visible()
    figure = frame.locator('img[alt="convergence comparison"]')
    expect(figure).to_be_visible()
    assert figure.evaluate("i => i.complete && i.naturalWidth") > 0
    page.screenshot(path=shots / "08_report_html.png")


def test_the_final_runs_link_opens_on_the_verdict_s_outcome_by_optimizer(page, expect, made, shots):
    page.goto(printed_link(made["study"], "its final runs by optimizer"))
    for group in ("Group: adam", "Group: gao"):
        expect(page.get_by_text(group).first).to_be_visible()
    expect(page.get_by_text("4 matching runs")).to_be_visible()
    expect(page.locator(".js-plotly-plot").first).to_be_visible()
    sections = section_names(page)
    assert sections[:3] == ["the verdict's outcome: best_val_loss", "loss", "accuracy"], sections
    charts = re.findall(
        r"^(loss/val|best_val_loss|accuracy/test|accuracy/val)$", page.inner_text("body"), re.M
    )
    assert charts[:2] == ["loss/val", "best_val_loss"], charts  # the outcome's curve and bars
    page.screenshot(path=shots / "09_final_runs_by_optimizer.png")


def test_a_trials_charts_begin_with_its_curves(page, expect, server, store, shots):
    trial = store["parent"].data.tags[Tag.BEST_RUN_ID]
    link = labels.run_link(server["base"], store["sweeps"], trial).replace("?", "/model-metrics?")
    page.goto(link)
    expect(page.locator(".js-plotly-plot").first).to_be_visible()
    sections = section_names(page)
    # accuracy/{test,val}, loss/{test,train,val}, GAO's per-parameter scales, the summaries
    assert sections == ["accuracy", "loss", "scale", "Model metrics"]
    page.screenshot(path=shots / "10_trial_charts.png")


def test_optuna_dashboard_tells_the_studies_apart_by_name(page, expect, made, tmp_path, shots):
    """The quick study's sweeps, as optuna-dashboard lists them: preset, quick, optimizer."""
    command = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    port = free_port()
    dashboard = serve(
        [
            command,
            made["storage"],
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--server",
            "wsgiref",
        ],
        tmp_path / "dashboard.log",
        {},
    )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).close()
                break
            except OSError:
                assert dashboard.poll() is None, "optuna-dashboard exited"
                assert time.monotonic() < deadline, "optuna-dashboard did not answer"
                time.sleep(0.3)
        page.goto(f"http://127.0.0.1:{port}/dashboard")
        for optimizer in ("adam", "gao"):
            name = page.get_by_text(
                re.compile(rf"^\d+\. default-quick\.{optimizer}-[0-9a-f]{{10}}$")
            )
            expect(name).to_be_visible()
        page.screenshot(path=shots / "11_optuna_dashboard.png")
    finally:
        stop(dashboard)


def test_the_ui_command_says_why_it_could_not_serve(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "gradalign.ui", "--port", str(port)],
            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"},
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO_ROOT,
        )
    assert done.returncode == 1
    assert (
        done.stdout
        == f"error: http://127.0.0.1:{port} is taken by another server: --port picks another\n"
    )
