"""Faults at exact moments, for tests/test_faults.py: a process started with this directory on
PYTHONPATH and ``$GRADALIGN_FAULT`` set runs one of these (Python imports ``sitecustomize`` at
start-up). Each patches a dependency's function (never gradalign's, so the same fault hits any
version of the pipeline; gradalign's ``experiment.train`` has kept its name and place)
once that module is imported:

- ``kill_after_job``: a sweep process kills itself (SIGKILL) as soon as its first Hydra job
  returned, that is after the trial's MLflow run ended and before Optuna was told;
- ``interrupt_after_stacked_batch``: a sweep process gets Ctrl-C (SIGINT) as soon as its first
  stacked batch trained: every run of the batch FINISHED, no trial told;
- ``kill_in_migration``: any process kills itself halfway through creating a database schema
  (alembic's 10th revision step), as a kill -9 at that moment would;
- ``lost_replies``: in a sweep process, the first Optuna trial created and the first MLflow
  runs created (the sweep's parent, a trial's) are committed, and then the connection fails as
  if the server restarted before it answered: the caller sees a transient error for a write
  that was made.
"""

import importlib.abc
import importlib.util
import os
import signal
import sys

FAULT = os.environ.get("GRADALIGN_FAULT", "")
SWEEP = sys.argv[0].endswith("train.py") and "-m" in sys.argv


def after_import(name, patch):
    """Call ``patch(module)`` once module ``name`` has been imported."""

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())


def kill_after_job(utils):
    run_job = utils.run_job

    def killing(*args, **kwargs):
        result = run_job(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return result

    utils.run_job = killing


def interrupt_after_stacked_batch(experiment):
    train = experiment.train
    calls = []  # the calls under way: train calls itself for runs that cannot stack

    def interrupting(*args, **kwargs):
        calls.append(args)
        try:
            results = train(*args, **kwargs)
        finally:
            calls.pop()
        if not calls:
            signal.raise_signal(signal.SIGINT)
        return results

    experiment.train = interrupting


def kill_in_migration(migration):
    update = migration.HeadMaintainer.update_to_step
    steps = []

    def killing(self, step):
        steps.append(step)
        if len(steps) == 10:
            os.kill(os.getpid(), signal.SIGKILL)
        return update(self, step)

    migration.HeadMaintainer.update_to_step = killing


def lose_reply(owner, name, when):
    """Make ``owner.name`` commit and then raise a transient database error, the first time
    ``when(*args, **kwargs)`` holds."""
    from sqlalchemy.exc import OperationalError

    write, lost = getattr(owner, name), []

    def committed_unanswered(*args, **kwargs):
        result = write(*args, **kwargs)
        if not lost and when(*args, **kwargs):
            lost.append(name)
            reason = Exception("server closed the connection unexpectedly")
            raise OperationalError(f"{name} (its reply lost)", {}, reason)
        return result

    setattr(owner, name, committed_unanswered)


def lost_trial_reply(storage):
    # what Optuna's cached storage calls to create a trial
    lose_reply(storage.RDBStorage, "_create_new_trial", lambda *args, **kwargs: True)


def lost_run_replies(sqlalchemy_store):
    def stage(kwargs):
        return {tag.key: tag.value for tag in kwargs.get("tags") or []}.get("stage")

    store = sqlalchemy_store.SqlAlchemyStore
    lose_reply(store, "create_run", lambda *args, **kwargs: stage(kwargs) == "sweep_parent")
    lose_reply(store, "create_run", lambda *args, **kwargs: stage(kwargs) == "sweep")


if FAULT == "kill_after_job" and SWEEP:
    after_import("hydra.core.utils", kill_after_job)
elif FAULT == "interrupt_after_stacked_batch" and SWEEP:
    after_import("gradalign.experiment", interrupt_after_stacked_batch)
elif FAULT == "kill_in_migration":
    after_import("alembic.runtime.migration", kill_in_migration)
elif FAULT == "lost_replies" and SWEEP:
    after_import("optuna.storages._rdb.storage", lost_trial_reply)
    after_import("mlflow.store.tracking.sqlalchemy_store", lost_run_replies)
