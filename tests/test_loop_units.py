"""The training loop's pieces, each alone: batch layouts, the lr schedule, the non-finite
policy, interval bookkeeping, the versioned trainer state."""

import pytest
import torch

from amused.training.config import OptimConfig
from amused.training.distributed import Layout
from amused.training.engine import Interval, NonFiniteError, NonFinitePolicy, StepOutcome, due, lr_factor
from amused.training.state import TrainState

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- layouts

@pytest.mark.parametrize("global_batch, micro, world, lanes, expected", [
    (16, 8, 2, 2, Layout(world_size=2, lanes=2, lane_batch=8, accum=1)),
    (16, 16, 1, 2, Layout(world_size=1, lanes=2, lane_batch=8, accum=1)),  # two ranks' lanes on one
    (64, 8, 2, 4, Layout(world_size=2, lanes=4, lane_batch=4, accum=4)),
    (24, 4, 3, 3, Layout(world_size=3, lanes=3, lane_batch=4, accum=2)),
])
def test_layout_splits_the_global_batch(global_batch, micro, world, lanes, expected):
    layout = Layout.plan(global_batch, micro, world, lanes)
    assert layout == expected
    assert layout.lane_batch * (lanes // world) * layout.accum * world == global_batch


@pytest.mark.parametrize("global_batch, micro, world, lanes, message", [
    (16, 8, 2, 3, r"data.lanes=3 must be a multiple of the number of ranks \(2\)"),
    (16, 6, 1, 4, r"data.micro_batch_size=6 must be a multiple of the lanes per rank \(4 lanes / 1 ranks = 4\)"),
    (12, 8, 1, 1, r"data.global_batch_size=12 must be a multiple of micro_batch_size x ranks \(8 x 1\)"),
    (16, 8, 4, 4, r"data.global_batch_size=16 must be a multiple of micro_batch_size x ranks \(8 x 4\)"),
])
def test_layout_refuses_batches_that_do_not_split(global_batch, micro, world, lanes, message):
    with pytest.raises(ValueError, match=message):
        Layout.plan(global_batch, micro, world, lanes)


# ---------------------------------------------------------------- lr schedule

def test_warmup_is_linear_then_constant():
    factor = lr_factor(OptimConfig(warmup_steps=4, schedule="constant"), total_steps=100)
    assert [factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert factor(99) == factor(1000) == 1.0
    assert lr_factor(OptimConfig(warmup_steps=0), total_steps=10)(0) == 1.0


def test_cosine_decays_from_the_peak_to_min_lr_ratio_and_stays():
    factor = lr_factor(OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), total_steps=14)
    assert factor(3) == 1.0  # the warm-up's last step reaches the peak
    assert factor(4) == 1.0  # the decay starts at the peak
    assert factor(9) == pytest.approx(0.55)  # half way: 0.1 + 0.9 * 0.5
    assert factor(14) == pytest.approx(0.1)
    assert factor(40) == pytest.approx(0.1)  # past the last step it stays at the floor
    decay = [factor(s) for s in range(4, 15)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lr_factor(OptimConfig(warmup_steps=0, schedule="cosine"), total_steps=10)(10) == pytest.approx(0.0)


# ---------------------------------------------------------------- non-finite policy

def test_nonfinite_steps_are_tolerated_until_the_limit_in_a_row(tmp_path):
    policy = NonFinitePolicy(limit=3)
    for step, bad in enumerate([True, True, False, True, True], start=1):
        policy.record(bad, step, str(tmp_path))
    assert policy.in_row == 2  # the good step reset the count
    with pytest.raises(NonFiniteError, match=r"stopping at step 6: 3 steps in a row .*max_nonfinite_in_row=3\); "
                                             r"the last good checkpoint is none\."):
        policy.record(True, 6, str(tmp_path))


def test_nonfinite_count_goes_on_after_a_resume_and_names_the_last_checkpoint(tmp_path):
    for step in (10, 20):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_{step:08d}" / "COMPLETE").write_text("{}")
    (tmp_path / "checkpoints" / "step_00000030").mkdir()  # no marker: not a checkpoint
    policy = NonFinitePolicy(limit=2, in_row=1)  # the checkpoint recorded one bad step just before it
    with pytest.raises(NonFiniteError, match="stopping at step 21: 2 steps in a row .* is step_00000020"):
        policy.record(True, 21, str(tmp_path))
    policy = NonFinitePolicy(limit=1)
    policy.record(False, 1, str(tmp_path))
    assert policy.in_row == 0


# ---------------------------------------------------------------- intervals

class _Task:
    """The two things an interval asks of a task."""

    def epoch(self) -> int:
        return 3

    def metrics(self, stats: list[float], samples: int, elapsed: float) -> dict:
        total, count = stats
        return {"loss": total / count, "samples_seen": samples, "elapsed": elapsed}


def test_metrics_and_checkpoints_are_due_every_n_steps_and_at_the_last():
    assert [s for s in range(1, 13) if due(s, 5, 12)] == [5, 10, 12]
    assert [s for s in range(1, 4) if due(s, 1, 3)] == [1, 2, 3]
    assert Interval(4, 9, 2, torch.device("cpu")).due(8) and not Interval(4, 9, 2, torch.device("cpu")).due(7)


def test_an_interval_sums_its_steps_and_starts_afresh():
    now = [100.0]
    interval = Interval(every=3, last_step=10, stats_size=2, device=torch.device("cpu"), clock=lambda: now[0])
    for bad, stats, events in [(False, [6.0, 2.0], {"codes_reinitialised": 4}), (True, [0.0, 0.0], {}),
                               (False, [3.0, 1.0], {"codes_reinitialised": 1})]:
        interval.stats += torch.tensor(stats, dtype=torch.float64)
        interval.count(bad, events)
    now[0] = 102.0
    record = interval.close(3, _Task(), StepOutcome(bad=False, lr=0.5, grad_norm=1.25), global_batch_size=8)
    assert record == {"step": 3, "epoch": 3, "loss": 3.0, "samples_seen": 24, "elapsed": 2.0, "lr": 0.5,
                      "grad_norm": 1.25, "samples_per_s": 12.0, "nonfinite_skipped": 1, "codes_reinitialised": 5}
    assert list(record)[:3] == ["step", "epoch", "loss"]
    assert (interval.steps, interval.skipped, interval.events, interval.started) == (0, 0, {}, 102.0)
    assert interval.stats.tolist() == [0.0, 0.0]
    interval.stats += torch.tensor([1.0, 1.0], dtype=torch.float64)
    interval.count(False, {})
    now[0] = 103.0
    assert interval.close(4, _Task(), StepOutcome(False, 0.5, None), 8)["samples_per_s"] == 8.0



def test_an_interval_reports_the_longest_checkpoint_stall_not_their_sum():
    interval = Interval(every=10, last_step=10, stats_size=2, device=torch.device("cpu"), clock=lambda: 1.0)
    for stall in (0.5, 2.0, 1.0):  # three checkpoints within one metrics line
        interval.count(False, {})
        interval.longest({"checkpoint_s": stall})
    interval.count(False, {})
    assert interval.events == {"checkpoint_s": 2.0}

# ---------------------------------------------------------------- trainer state

def test_train_state_round_trips_with_the_task_state_beside_its_keys():
    state = TrainState(step=40, world_size=2, global_batch_size=16, nonfinite_in_row=1,
                       task={"reader": {"epoch": 1, "offsets": [3, 4]}, "lanes": 2})
    data = state.to_dict()
    assert data == {"version": 1, "step": 40, "world_size": 2, "global_batch_size": 16, "nonfinite_in_row": 1,
                    "reader": {"epoch": 1, "offsets": [3, 4]}, "lanes": 2}
    assert TrainState.from_dict(data) == state


def test_a_trainer_state_without_a_version_is_version_1():
    # trainer.json as checkpoints wrote it before the version was recorded.
    written = {"step": 20, "world_size": 2, "global_batch_size": 16, "nonfinite_in_row": 0,
               "ranks": [{"reader": {}}, {"reader": {}}]}
    state = TrainState.from_dict(written)
    assert (state.step, state.world_size, state.global_batch_size, state.nonfinite_in_row) == (20, 2, 16, 0)
    assert state.task == {"ranks": [{"reader": {}}, {"reader": {}}]}


def test_a_trainer_state_of_an_unknown_version_or_layout_is_refused():
    data = TrainState(step=1, world_size=1, global_batch_size=8, nonfinite_in_row=0).to_dict()
    with pytest.raises(ValueError, match=r"run/trainer.json: format version 2 is not one this amused reads "
                                         r"\(it reads version 1\)"):
        TrainState.from_dict({**data, "version": 2}, "run/trainer.json")
    with pytest.raises(ValueError, match="trainer state: missing world_size, nonfinite_in_row"):
        TrainState.from_dict({"step": 1, "global_batch_size": 8})
    with pytest.raises(ValueError, match=r"task state key\(s\) \['step'\] would overwrite the trainer's own"):
        TrainState(step=1, world_size=1, global_batch_size=8, nonfinite_in_row=0, task={"step": 5}).to_dict()
