"""The battery of bad command lines a user might type (issue 26): each case is what ``python
train.py`` is given, and what its refusal must say.

``tests/test_bad_input.py`` runs every case (in process: no case needs a process of its own)
and asserts its exit status, its one line and what it leaves behind. ``benchmarks/battery.py``
runs each as a user would, in a process of its own, and counts the outcomes by kind: one clear
line, Hydra's own message, an unclear line, a traceback, started anyway.

Placeholders in ``argv``, filled per case: ``{tmp}`` a fresh directory, ``{port}`` a closed
local port.
"""

from __future__ import annotations

import dataclasses

# What every case adds, so that one that starts anyway ends in seconds.
TINY = ("trainer.epochs=1", "dataset.generation.num_samples=1000")
SWEEP = ("-m", "hydra.sweeper.n_trials=2")


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad command line: ``argv`` (without TINY, and SWEEP for a sweep), and ``needles``,
    the words its one line must hold (the key, the value, what is allowed or what to do). A
    case Hydra refuses itself (an unknown option, a key not in the config) has ``hydra=True``:
    Hydra's message, exit status 1."""

    id: str
    argv: tuple[str, ...]
    needles: tuple[str, ...]
    sweep: bool = False
    hydra: bool = False

    def command(self) -> list[str]:
        return [*(SWEEP if self.sweep else ()), *TINY, *self.argv]


def run(id: str, *argv: str, needles: tuple[str, ...], hydra: bool = False) -> Case:
    return Case(id, argv, needles, hydra=hydra)


def sweep(id: str, *argv: str, needles: tuple[str, ...], hydra: bool = False) -> Case:
    return Case(id, argv, needles, sweep=True, hydra=hydra)


LONG_NAME = "x" * 501
POSTGRES_CLOSED = "postgresql+psycopg://u:p@127.0.0.1:{port}/optuna"

CASES: tuple[Case, ...] = (
    # --- single runs: named in issue 26 ---
    run("device-cuda", "trainer.device=cuda", needles=("trainer.device", "cuda", "cpu")),
    run("uri-unknown-scheme", "tracking.uri=foo://bar", needles=("tracking.uri", "foo://bar")),
    run("uri-file", "tracking.uri=file:./somewhere", needles=("tracking.uri", "file:./somewhere")),
    run("uri-empty", "tracking.uri=''", needles=("tracking.uri", "''", "null")),
    run("experiment-empty", "tracking.experiment=''", needles=("tracking.experiment", "''")),
    run(
        "experiment-too-long",
        f"tracking.experiment={LONG_NAME}",
        needles=("tracking.experiment", "500"),
    ),
    run("plus-typo", "+trainer.epoch=3", needles=("trainer.epoch", "trainer.epochs")),
    run("lr-empty", "optimizer.lr=''", needles=("optimizer.lr", "''", "number")),
    run(
        "beta-abc",
        "optimizer=gao",
        "optimizer.beta=abc",
        needles=("optimizer.beta", "'abc'", "number"),
    ),
    # --- single runs: refused clearly before issue 26 ---
    run("epochs-0", "trainer.epochs=0", needles=("trainer.epochs", "0", ">= 1")),
    run("epochs-abc", "trainer.epochs=abc", needles=("trainer.epochs", "'abc'", ">= 1")),
    run("epochs-empty", "trainer.epochs=''", needles=("trainer.epochs", "''", ">= 1")),
    run("batch-negative", "trainer.batch_size=-5", needles=("trainer.batch_size", "-5")),
    run("batch-float", "trainer.batch_size=1.5", needles=("trainer.batch_size", "1.5")),
    run("eval-batch-0", "trainer.eval_batch_size=0", needles=("trainer.eval_batch_size", "0")),
    run("device-tpu", "trainer.device=tpu", needles=("trainer.device", "'tpu'", "cpu")),
    run("threads-0", "trainer.threads=0", needles=("trainer.threads", "0")),
    run("seed-float", "seed.model=1.5", needles=("seed.model", "1.5", "integer")),
    run("seed-abc", "seed.data=abc", needles=("seed.data", "'abc'", "integer")),
    run("objective", "objective=worst", needles=("objective", "'worst'", "last")),
    run("lr-negative", "optimizer.lr=-1", needles=("optimizer.lr", "-1")),
    run("lr-nan", "optimizer.lr=nan", needles=("optimizer.lr", "nan", "finite")),
    run("lr-inf", "optimizer.lr=inf", needles=("optimizer.lr", "inf", "finite")),
    run("beta-1.5", "optimizer=gao", "optimizer.beta=1.5", needles=("beta", "1.5", "[0, 1)")),
    run("gao-target", "optimizer=gao", "optimizer.target=foo", needles=("target", "'foo'")),
    run(
        "gao-granularity",
        "optimizer=gao",
        "optimizer.granularity=foo",
        needles=("granularity", "'foo'"),
    ),
    run("gao-base", "optimizer=gao", "optimizer.base=Nope", needles=("base", "Nope")),
    run("gao-min-scale", "optimizer=gao", "optimizer.min_scale=2", needles=("min_scale", "2")),
    run("sgd-momentum", "optimizer=sgd", "optimizer.momentum=-1", needles=("momentum", "-1")),
    run("hidden-0", "model.hidden=[0]", needles=("model.hidden", "[0]")),
    run("val-fraction", "dataset.val_fraction=2", needles=("val_fraction", "2")),
    run("samples-0", "dataset.generation.num_samples=0", needles=("num_samples", "0")),
    run("store-wait-0", "tracking.store_wait_s=0", needles=("tracking.store_wait_s", "0")),
    run("flush-negative", "tracking.flush_interval_s=-1", needles=("flush_interval_s", "-1")),
    run("ui-url", "tracking.ui_url=notaurl", needles=("tracking.ui_url", "notaurl", "http")),
    run(
        "store-dir-missing",
        "tracking.uri=sqlite:///{tmp}/missing/mlflow.db",
        needles=("{tmp}/missing", "does not exist"),
    ),
    run(
        "server-closed",
        "tracking.uri=http://127.0.0.1:{port}",
        needles=("http://127.0.0.1:{port}", "unreachable"),
    ),
    run("unknown-kwarg", "+optimizer.betaa=0.9", needles=("betaa",)),
    run("model-unknown", "model=nope", needles=("nope", "mlp"), hydra=True),
    run("optimizer-unknown", "optimizer=nope", needles=("nope", "gao"), hydra=True),
    run("dataset-unknown", "dataset=nope", needles=("nope", "mnist1d"), hydra=True),
    run("parallel-unknown", "parallel=nope", needles=("nope", "serial"), hydra=True),
    run("experiment-unknown", "experiment=nope", needles=("nope", "seed_note"), hydra=True),
    run("key-typo", "trainer.epoch=3", needles=("epoch",), hydra=True),
    run("override-syntax", "optimizer.lr=[1,", needles=("[1,",), hydra=True),
    # --- single runs: added by issue 26 ---
    run("plus-seed", "+seed.modle=1", needles=("seed.modle", "seed.model")),
    run("plus-tracking", "+tracking.experimnt=x", needles=("tracking.experimnt", "experiment")),
    run("plus-top-level", "+objectiv=best", needles=("objectiv", "objective")),
    run("uri-no-driver", "tracking.uri=mysql://u:p@127.0.0.1/db", needles=("mysql", "driver")),
    # --- sweeps: named in issue 26 ---
    sweep(
        "direction",
        "hydra.sweeper.direction=maximise",
        needles=("hydra.sweeper.direction", "maximise", "maximize"),
    ),
    sweep(
        "storage-not-a-url",
        "hydra.sweeper.storage=notaurl",
        "hydra.sweeper.study_name=s",
        needles=("hydra.sweeper.storage", "notaurl", "sqlite:///"),
    ),
    sweep(
        "storage-closed-port",
        f"hydra.sweeper.storage={POSTGRES_CLOSED}",
        "hydra.sweeper.study_name=s",
        "tracking.store_wait_s=1",
        needles=("127.0.0.1:{port}", "start it"),
    ),
    sweep(
        "storage-no-driver",
        "hydra.sweeper.storage=mysql://u:p@127.0.0.1/optuna",
        "hydra.sweeper.study_name=s",
        needles=("hydra.sweeper.storage", "mysql", "driver"),
    ),
    sweep("n-jobs-0", "hydra.sweeper.n_jobs=0", needles=("hydra.sweeper.n_jobs", "0", ">= 1")),
    sweep("n-trials-0", "hydra.sweeper.n_trials=0", needles=("hydra.sweeper.n_trials", "0")),
    sweep("n-trials-neg", "hydra.sweeper.n_trials=-1", needles=("hydra.sweeper.n_trials", "-1")),
    sweep(
        "n-trials-0-stacked",
        "parallel=stacked",
        "hydra.sweeper.n_trials=0",
        needles=("hydra.sweeper.n_trials", "0"),
    ),
    sweep(
        "n-trials-neg-stacked",
        "parallel=stacked",
        "hydra.sweeper.n_trials=-1",
        needles=("hydra.sweeper.n_trials", "-1"),
    ),
    sweep(
        "storage-no-study-name",
        "hydra.sweeper.storage=sqlite:///{tmp}/optuna.db",
        needles=("hydra.sweeper.study_name", "hydra.sweeper.storage"),
    ),
    sweep(
        "study-name-empty",
        "hydra.sweeper.storage=sqlite:///{tmp}/optuna.db",
        "hydra.sweeper.study_name=''",
        needles=("hydra.sweeper.study_name", "''"),
    ),
    sweep("interval-reversed", "optimizer.lr=interval(1,0)", needles=("optimizer.lr", "1", "0")),
    sweep("range-empty", "optimizer.lr=range(1,0)", needles=("optimizer.lr", "range(1,0)")),
    sweep(
        "log-from-zero",
        "optimizer.lr=tag(log, interval(0, 1))",
        needles=("optimizer.lr", "log", "0"),
    ),
    # --- sweeps: refused clearly before issue 26 ---
    sweep(
        "failure-rate",
        "hydra.sweeper.max_failure_rate=2",
        needles=("hydra.sweeper.max_failure_rate", "2"),
    ),
    sweep(
        "search-key-typo",
        "optimizer=gao",
        "optimizer.bta=interval(0.5,0.9)",
        needles=("optimizer.bta", "beta"),
    ),
    sweep(
        "search-range-invalid",
        "optimizer=gao",
        "optimizer.beta=interval(0.5,1.5)",
        needles=("optimizer.beta", "[0, 1)"),
    ),
    sweep("epochs-0", "trainer.epochs=0", needles=("trainer.epochs", "0", ">= 1")),
    sweep("workers-0", "parallel.workers=0", needles=("parallel.workers", "0")),
    sweep(
        "grid-continuous",
        "hydra/sweeper/sampler=grid",
        needles=("optimizer.lr", "choice"),
    ),
    sweep(
        "server-closed",
        "tracking.uri=http://127.0.0.1:{port}",
        needles=("http://127.0.0.1:{port}", "unreachable"),
    ),
    sweep(
        "storage-dir-missing",
        "hydra.sweeper.storage=sqlite:///{tmp}/missing/optuna.db",
        "hydra.sweeper.study_name=s",
        needles=("{tmp}/missing", "does not exist"),
    ),
    sweep(
        "pruner-warmup",
        "hydra/sweeper/pruner=median",
        "hydra.sweeper.pruner.n_warmup_steps=-1",
        needles=("n_warmup_steps", "-1"),
    ),
    sweep(
        "directions-two",
        "hydra.sweeper.direction=[minimize,maximize]",
        needles=("hydra.sweeper.direction", "minimize"),
    ),
    sweep("sampler-unknown", "hydra/sweeper/sampler=nope", needles=("nope",), hydra=True),
    sweep("pruner-unknown", "hydra/sweeper/pruner=nope", needles=("nope",), hydra=True),
    sweep("interval-syntax", "optimizer.lr=interval(a,b)", needles=("interval",), hydra=True),
    # --- sweeps: added by issue 26 ---
    sweep("plus-typo", "+trainer.epoch=3", needles=("trainer.epoch", "trainer.epochs")),
    sweep("uri-empty", "tracking.uri=''", needles=("tracking.uri", "''")),
    sweep(
        "storage-empty",
        "hydra.sweeper.storage=''",
        needles=("hydra.sweeper.storage", "''"),
    ),
)
