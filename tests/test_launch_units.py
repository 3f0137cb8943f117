"""Which rank errors stop a Ray Train run at once and which are retried (training/launch.py's
one rule), checked on the callback Ray Train's controller runs and on the final message,
without a Ray cluster."""

import json

import pytest
from ray.train import WorkerGroupError
from ray.train.v2._internal.execution.controller.state import RestartingState, RunningState

from amused.training.config import parse_config
from amused.training.engine import NonFiniteError
from amused.training.launch import _gave_up, _NotRetried, _StopOnDeterministicError, deterministic

pytestmark = pytest.mark.unit


def decode_error(text: str) -> json.JSONDecodeError:
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return exc
    raise AssertionError("decoded")


STOPS = [ValueError("data.dataset: no token dataset at /none"),
         NonFiniteError("stopping at step 6: 3 steps in a row had a non-finite loss")]
RETRIED = [decode_error('{"step": 3, "lo'),  # a metrics.jsonl line cut off by a SIGKILL
           UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
           OSError(28, "No space left on device"), TimeoutError("collective timed out"),
           RuntimeError("gloo: connection closed by peer")]


@pytest.mark.parametrize("error", STOPS, ids=lambda e: type(e).__name__)
def test_start_up_errors_and_divergence_are_deterministic(error):
    assert deterministic(error)


@pytest.mark.parametrize("error", RETRIED, ids=lambda e: type(e).__name__)
def test_decode_and_io_errors_are_retried(error):
    assert not deterministic(error)


def restarting(failures: dict) -> RestartingState:
    return RestartingState(WorkerGroupError("worker errors", failures))


@pytest.mark.parametrize("error", STOPS, ids=lambda e: type(e).__name__)
def test_the_controller_callback_stops_a_restart_for_a_deterministic_error(error):
    with pytest.raises(_NotRetried) as caught:
        _StopOnDeterministicError().after_controller_state_update(RunningState(), restarting({0: OSError(), 1: error}))
    assert caught.value.rank == 1 and caught.value.error is error


def test_the_controller_callback_lets_other_errors_restart():
    callback = _StopOnDeterministicError()
    callback.after_controller_state_update(RunningState(), restarting({0: RETRIED[0], 1: RETRIED[2]}))
    callback.after_controller_state_update(restarting({0: STOPS[0]}), RunningState())  # not a restart


def config(tmp_path):
    return parse_config({"run_dir": str(tmp_path / "run"), "steps": 8, "max_failures": 2,
                         "data": {"dataset": str(tmp_path / "tokens"), "global_batch_size": 4},
                         "model": {"preset": "tiny"}})


def test_a_deterministic_stop_is_the_ranks_own_error_without_rerun_advice(tmp_path):
    diverged = STOPS[1]
    assert _gave_up(config(tmp_path), WorkerGroupError("x", {0: RuntimeError("peer gone"), 1: diverged})) is diverged


def test_a_retried_error_stops_after_max_failures_with_rerun_advice(tmp_path):
    error = _gave_up(config(tmp_path), WorkerGroupError("x", {1: RETRIED[0]}))
    assert isinstance(error, RuntimeError)
    assert str(error) == ("training stopped after 2 restart(s) (train.max_failures), rank 1 failed: JSONDecodeError: "
                          f"{RETRIED[0]}; no checkpoint was complete yet; a rerun starts over")
