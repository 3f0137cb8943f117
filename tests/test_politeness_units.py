"""The politeness rules without a network: the User-Agent, the per-domain gate's count,
and the per-process state kept per download run."""

import threading

import pytest

from amused.pipeline.politeness import BREAKER_OPEN, Courtesy, Politeness, PolitenessRefused, courtesy_for

pytestmark = pytest.mark.unit


def politeness(**kw) -> Politeness:
    return Politeness(**{"contact_url": "", "token": None, "concurrency": 8, "rate": 0.0, "breaker": 3,
                         "robots": True, **kw})


def test_user_agent_names_the_client_its_token_and_contact():
    assert politeness().user_agent() == "amused-pipeline/0.1.0 (compatible)"
    assert politeness(token="mybot", contact_url="mailto:ops@example.org").user_agent() == \
        "amused-pipeline/0.1.0 (compatible; mybot; +mailto:ops@example.org)"
    assert politeness(token="MyBot").robots_agent() == "mybot" and politeness().robots_agent() == "amused-pipeline"


def test_the_breaker_counts_consecutive_failures_and_opens_at_n():
    domain = Courtesy(politeness(), None)._domain("x.test")
    for outcome in (True, True, False, True, None, True):  # a good answer resets; a refusal is neither
        domain.enter()
        domain.leave(outcome)
    assert domain.failures == 2 and not domain.tripped
    domain.enter()
    domain.leave(True)
    with pytest.raises(PolitenessRefused, match=f"^{BREAKER_OPEN} for x.test after 3 "):
        domain.enter()


def test_a_request_waits_while_open_ones_could_still_trip_the_breaker():
    domain = Courtesy(politeness(breaker=2), None)._domain("x.test")
    domain.enter()
    domain.enter()
    said = []

    def ask():
        try:
            domain.enter()
            said.append("sent")
        except PolitenessRefused as exc:
            said.append(str(exc))

    third = threading.Thread(target=ask)
    third.start()
    third.join(0.2)
    assert third.is_alive()  # two open requests may both fail: a third would be one too many
    domain.leave(True)
    domain.leave(True)
    third.join(2)
    assert not third.is_alive() and domain.open == 0 and said[0].startswith(BREAKER_OPEN)


def test_state_is_per_run_and_process():
    p = politeness()
    first = courtesy_for("run-1", p, None)
    assert courtesy_for("run-1", p, None) is first and courtesy_for("run-2", p, None) is not first
    for i in range(3, 8):  # a long-lived Ray worker keeps only the latest runs
        courtesy_for(f"run-{i}", p, None)
    assert courtesy_for("run-1", p, None) is not first
