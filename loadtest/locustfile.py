"""Locust entry point for the `slora` model.

    locust -f loadtest/locustfile.py                       # web UI on http://localhost:8089
    locust -f loadtest/locustfile.py --scenario s1 --protocol http --host localhost
    LOADTEST_SCENARIO=smoke locust -f loadtest/locustfile.py --headless -u 4 -t 20s

Custom options (also in the web UI form): --scenario, --scenario-profile, --overrides,
--protocol, --grpc-port, --http-port, --openai-port, --slo-ttft, --request-timeout, --raw-out.
Headless runs with reports: `python -m loadtest.run` (see loadtest/run.py).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

try:
    import loadtest  # noqa: F401  (installed editable, or run from the repo root)
except ModuleNotFoundError:  # `locust -f loadtest/locustfile.py` puts only loadtest/ on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gevent  # noqa: E402
from locust import events  # noqa: E402
from locust.stats import CSV_STATS_INTERVAL_SEC  # noqa: E402

from loadtest import users  # noqa: E402

# OpenAIChatUser is not listed: a third User class here left the compose master/worker run
# with no requests at all (tests/docker/test_compose_locust.py); `python -m loadtest.run
# --protocol openai` picks it through users.USER_CLASSES
from loadtest.users import GrpcStreamUser, HttpStreamUser  # noqa: E402, F401  (Locust finds them)

log = logging.getLogger("loadtest")


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    users.add_arguments(parser)


@events.init.add_listener
def _on_init(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is None:  # library use without our options
        return
    # gevent's timers count from the loop's cached clock, stale by the seconds spent importing
    # before the loop first ran: refresh it, or --run-time ends the test that much early.
    gevent.get_hub().loop.update_now()
    # Fail fast on a bad scenario (an exception in an init listener ends Locust).
    users.resolve_adapters(users.scenario_from_options(options))


@events.test_start.add_listener
def _on_test_start(environment, **_kwargs) -> None:
    # Before Locust picks the user classes to spawn: start_run keeps the protocol's ones.
    users.start_run(environment)


@events.test_stop.add_listener
def _on_test_stop(environment, **_kwargs) -> None:
    run = getattr(environment, "slora_run", None)
    if run is not None:
        log.info("scenario %s: %d requests completed, %d failed", run.scenario.name,
                 run.completed, run.failed)
        run.close()


@events.quitting.add_listener
def _on_quitting(environment, **_kwargs) -> None:
    # Locust rewrites its CSV files once a second and not at exit: let it write once more, so
    # the requests that finished while the test was stopping are in locust_stats.csv too.
    options = environment.parsed_options
    if options is not None and options.csv_prefix:
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.25)
