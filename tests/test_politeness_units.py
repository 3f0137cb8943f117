"""The politeness rules without a network: the User-Agent, the per-domain gate's count,
the RFC 9309 matcher, and the per-process state kept per download run, bounded."""

import threading
import time
import urllib.request

import pytest

from amused.pipeline.download import classify
from amused.pipeline.politeness import (
    BREAKER_OPEN,
    DOMAIN_OPTED_OUT,
    FAILURE,
    GOOD,
    OPT_OUT,
    ROBOTS_UNREACHABLE,
    Courtesy,
    Politeness,
    PolitenessRefused,
    RobotsRules,
    _Fetching,
    courtesy_for,
    parse_robots,
)

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
    for outcome in (FAILURE, FAILURE, GOOD, FAILURE, None, FAILURE):  # a good answer resets; a refusal is neither
        domain.enter()
        domain.leave(outcome)
    assert domain.failures == 2 and not domain.tripped
    domain.enter()
    domain.leave(FAILURE)
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
    domain.leave(FAILURE)
    domain.leave(FAILURE)
    third.join(2)
    assert not third.is_alive() and domain.open == 0 and said[0].startswith(BREAKER_OPEN)


def test_state_is_per_run_and_process():
    p = politeness()
    first = courtesy_for("run-1", p, None)
    assert courtesy_for("run-1", p, None) is first and courtesy_for("run-2", p, None) is not first
    for i in range(3, 8):  # a long-lived Ray worker keeps only the latest runs
        courtesy_for(f"run-{i}", p, None)
    assert courtesy_for("run-1", p, None) is not first


def tripped_by(*outcomes) -> str:
    domain = Courtesy(politeness(), None)._domain("x.test")
    for outcome in outcomes:
        domain.enter()
        domain.leave(outcome)
    with pytest.raises(PolitenessRefused) as refused:
        domain.enter()
    return str(refused.value)


def test_a_breaker_opened_by_opt_outs_is_a_permanent_reason():
    """A site that opted out is not asked again by --retry-failed; one that was down is."""
    opted = tripped_by(OPT_OUT, FAILURE, OPT_OUT)
    assert opted.startswith(f"{DOMAIN_OPTED_OUT} for x.test: 2 of its last 3 answers")
    assert classify(opted) == classify(f"<urlopen error {opted}>") == ("domain_opted_out", "permanent")
    failed = tripped_by(FAILURE, OPT_OUT, FAILURE)
    assert failed.startswith(BREAKER_OPEN) and classify(failed) == ("domain_breaker", "transient")
    assert classify(tripped_by(OPT_OUT, GOOD, FAILURE, FAILURE, FAILURE))[0] == "domain_breaker"  # a good answer resets


def allowed(robots: str, paths: list[str], agent: str = "amused-pipeline") -> list[bool]:
    rules = parse_robots(robots, agent)
    return [rules.allows(f"http://x.test{p}") for p in paths]


def test_robots_wildcards_and_end_anchor():
    robots = "User-agent: *\nDisallow: /*.jpg$\nDisallow: /img/*/private/\n"
    assert allowed(robots, ["/a/b.jpg", "/b.jpg?x=1", "/b.jpgx", "/b.png", "/img/2024/private/1.png",
                            "/img/private/1.png", "/img/a/b/private/", "/robots.txt"]) == \
        [False, True, True, True, False, True, False, True]
    # `$` is an anchor only at the end of a rule; in a URL, `$` and `*` are plain characters
    assert allowed("User-agent: *\nDisallow: /a$b\n", ["/a$b", "/a$bc", "/a"]) == [False, False, True]
    assert allowed("User-agent: *\nDisallow: /a*$\n", ["/a$b", "/b"]) == [False, True]


def test_robots_longest_match_wins_and_allow_wins_a_tie():
    assert allowed("User-agent: *\nDisallow: /\nAllow: /images/\n", ["/images/1.jpg", "/imagesx", "/", ""]) == \
        [True, False, False, False]
    assert allowed("User-agent: *\nAllow: /images/\nDisallow: /images/private\n",
                   ["/images/privatex.jpg", "/images/public.jpg"]) == [False, True]
    assert allowed("User-agent: *\nDisallow: /a/\nAllow: /a/\n", ["/a/1"]) == [True]  # tie: allow
    assert allowed("User-agent: *\nDisallow: /a*\nAllow: /a/\n", ["/a/1", "/ab"]) == [True, False]
    assert allowed("User-agent: *\nDisallow:\n", ["/x"]) == [True]  # an empty rule matches nothing


def test_robots_percent_encoding_is_normalised():
    robots = "User-agent: *\nDisallow: /caf%C3%A9/\nDisallow: /%7Euser/\nDisallow: /a%2fb\n"
    assert allowed(robots, ["/café/1.jpg", "/caf%c3%a9/1.jpg", "/~user/x", "/%7euser/x", "/a%2Fb", "/a/b"]) == \
        [False, False, False, False, False, True]


def test_robots_group_selection_and_merging():
    robots = ("User-agent: *\nDisallow: /all/\n\n"
              "User-agent: Amused-Pipeline\nDisallow: /product/\n\n"
              "User-agent: MyBot\nUser-agent: other\nDisallow: /mine/\n\n"
              "User-agent: mybot\nDisallow: /more/\n")
    paths = ["/all/1", "/product/1", "/mine/1", "/more/1"]
    assert allowed(robots, paths, "mybot") == [True, True, False, False]  # both mybot groups, merged
    assert allowed(robots, paths, "otherbot") == [True, False, True, True]  # no group of its own: the product's
    assert allowed(robots, paths, "other") == [True, True, False, True]
    assert allowed(robots.split("\n\nUser-agent: Amused")[0], paths, "otherbot") == [False, True, True, True]
    assert allowed("User-agent: otherbot\nDisallow: /\n", paths, "mybot") == [True] * 4  # no group for us
    assert parse_robots(robots, "mybot") == RobotsRules((("/mine/", False), ("/more/", False)))  # ours only


def test_per_process_state_is_bounded_and_keeps_busy_domains():
    courtesy = Courtesy(politeness(), None, kept=3)
    held = courtesy._domain("held.test")
    held.enter()  # a request open: never dropped
    for i in range(10):
        courtesy._domain(f"{i}.test")
    assert list(courtesy._domains) == ["held.test", "8.test", "9.test"] and courtesy._domain("held.test") is held
    held.leave(GOOD)
    courtesy._domain("10.test")
    assert list(courtesy._domains) == ["9.test", "held.test", "10.test"]  # held.test was just used
    for i in range(10):
        courtesy._robots[f"http://{i}.test"] = RobotsRules()
        courtesy._trim(courtesy._robots, lambda v: False)
    assert list(courtesy._robots) == ["http://7.test", "http://8.test", "http://9.test"]


def test_waiting_for_another_threads_robots_txt_is_bounded():
    """A fetch that never ends (here: one no thread will finish) holds the origin's other
    URLs for at most ROBOTS_WAIT_REQUESTS request timeouts, then they are unreachable."""
    courtesy = Courtesy(politeness(), None)
    courtesy._robots["http://x.test"] = _Fetching()
    request = urllib.request.Request("http://x.test/a.jpg")
    request.timeout = 0.02  # what urllib's opener sets
    began = time.monotonic()
    with pytest.raises(PolitenessRefused, match=f"^{ROBOTS_UNREACHABLE} for http://x.test .*still fetching"):
        courtesy._check_robots("http://x.test", request, None)
    assert 0.2 <= time.monotonic() - began < 5  # ~0.24 s; the bound only says it ends (a loaded machine stalls)
