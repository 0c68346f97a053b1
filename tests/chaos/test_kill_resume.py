"""SIGKILL a tiny training at seeded points (mid-step and mid-checkpoint-write) and resume it each time: the losses
equal an uninterrupted run's bit for bit, and no kill leaves a checkpoint that neither loads nor says it is
incomplete."""

import functools

import pytest

from tests.chaos.harness import assert_same_trace, fit_command, run_to_completion, run_with_kills
from tests.chaos.loss_trace import read_trace


def _chaos(tmp_path, devices, max_steps, every_n_train_steps, num_kills, seed):
    reference, chaos, commands = tmp_path / "uninterrupted", tmp_path / "killed", {}
    for root in (reference, chaos):
        commands[root] = functools.partial(fit_command, root, max_steps=max_steps,
                                           every_n_train_steps=every_n_train_steps, devices=devices)
    run_to_completion(reference, commands[reference])
    report = run_with_kills(chaos, commands[chaos], max_steps, num_kills, seed)
    repeated = assert_same_trace(read_trace(chaos / "trace.jsonl"), read_trace(reference / "trace.jsonl"))
    assert report.total_kills == num_kills
    print(f"\ndevices={devices} steps={max_steps} checkpoint every {every_n_train_steps}: {report.total_kills} kills "
          f"({dict(report.kills)}, {report.kills_during_write} while a checkpoint was being written), "
          f"{report.attempts} attempts, {repeated} steps logged again after a resume and equal, "
          f"{report.checkpoints_checked} checkpoints loaded, {report.incomplete_marked} temporary entries seen, "
          f"last.ckpt named steps {report.last_steps}; all {max_steps} losses bit-identical")
    return report


def test_ten_kills_resume_to_the_uninterrupted_loss_trace(tmp_path):
    _chaos(tmp_path, devices=1, max_steps=20, every_n_train_steps=2, num_kills=10, seed=18)


@pytest.mark.slow
def test_kills_at_expert_parallel_2_on_gloo_resume_to_the_uninterrupted_loss_trace(tmp_path):
    _chaos(tmp_path, devices=2, max_steps=12, every_n_train_steps=1, num_kills=10, seed=2)


@pytest.mark.soak
@pytest.mark.parametrize("seed", [101, 102, 103])
def test_soak(tmp_path, seed):
    _chaos(tmp_path, devices=1, max_steps=24, every_n_train_steps=1, num_kills=20, seed=seed)
