"""A sweep's SLURM jobs without a cluster: a batch that SLURM stopped, the jobs found in
submitit's folders, and a job that does not die with the sweep process that submitted it (on its
host) while a worker the sweep started does. The cluster itself: tests/test_slurm.py."""

import os
import subprocess
import sys

from omegaconf import OmegaConf
from submitit.core.utils import FailedJobError, UncompletedJobError

from gradalign import processes
from gradalign.sweep import slurm


def test_a_job_ended_without_a_result_is_a_stopped_batch_naming_job_and_state():
    error = UncompletedJobError(
        "Job 12 (task: 1) with path /s/.submitit/12_1/12_1_0_result.pkl\n"
        "has not produced any output (state: CANCELLED by 0)\nError stream produced:\n..."
    )
    stopped = slurm.stopped_batch(error)
    assert isinstance(stopped, slurm.JobsStopped)
    assert str(stopped) == (
        "Job 12 (task: 1) ended CANCELLED by 0 before returning "
        "(scancel, a time limit or a node failure)"
    )


def test_other_launcher_errors_are_not_a_stopped_batch():
    assert slurm.stopped_batch(FailedJobError("Job 3 raised")) is None
    assert slurm.stopped_batch(RuntimeError("no")) is None


def test_the_jobs_of_a_slurm_launcher_are_its_submitit_folders(tmp_path):
    folders = tmp_path / ".submitit"
    for name in ("12_0", "12_1", "15", "9_3", "logs"):
        (folders / name).mkdir(parents=True)
    launcher = OmegaConf.create(
        {"_target_": slurm.LAUNCHER, "submitit_folder": str(folders / "%j")}
    )
    assert slurm.job_ids(launcher) == ["9", "12", "15"]
    local = OmegaConf.create(
        {
            "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
            "submitit_folder": str(folders / "%j"),
        }
    )
    assert slurm.job_ids(local) == []
    assert slurm.cancel_jobs(local, timeout_s=1) == []


WATCHES = "from gradalign import processes; processes.adopt(); print(len(processes._watched))"


def watches(owner_token):
    env = {**os.environ, processes.OWNER_ENV: owner_token}
    result = subprocess.run(
        [sys.executable, "-c", WATCHES], env=env, capture_output=True, text=True, check=True
    )
    return int(result.stdout)


def test_a_process_watches_an_owner_that_started_it_and_not_one_that_did_not():
    assert watches(processes.owner_token()) == 1  # this process started it: a worker
    bystander = subprocess.Popen(["sleep", "60"])  # alive, on this host, but not an ancestor:
    try:  # what the sweep process is to a SLURM job on the sweep's own host
        assert watches(processes.owner_token(bystander.pid)) == 0
    finally:
        bystander.kill()
        bystander.wait()


def test_ancestors_are_the_parent_chain():
    chain = processes.ancestors()
    assert chain[0] == os.getppid()
    assert os.getpid() not in chain and 1 not in chain
