"""Start-up phases: a timed log line per phase, and a bar thread that never outlives its phase."""
import logging
import threading
import time

import pytest

from lmserve import startup


def test_phase_logs_its_time_and_details(caplog):
    log = logging.getLogger("test.startup")
    with caplog.at_level(logging.INFO, logger="test.startup"):
        with startup.phase(log, "warming up") as info:
            time.sleep(0.05)
            info["done"] = "3 things"
        with startup.phase(log, "quick"):
            pass
    assert [r.getMessage() for r in caplog.records][0].startswith("warming up: 3 things (0.")
    assert caplog.records[1].getMessage() == "quick (0.0 s)"


def test_phase_bar_thread_stops_and_failures_log_nothing(caplog, monkeypatch):
    monkeypatch.setattr(startup, "BAR_DELAY_S", 0.01)
    log = logging.getLogger("test.startup")
    with caplog.at_level(logging.INFO, logger="test.startup"):
        with pytest.raises(RuntimeError):
            with startup.phase(log, "failing"):
                time.sleep(0.1)
                raise RuntimeError("boom")
    assert not caplog.records                       # no "done" line for a phase that failed
    assert not [t for t in threading.enumerate() if t.name == "lmserve-startup-bar"]


def test_progress_yields_every_item():
    assert list(startup.progress(range(5), "items")) == [0, 1, 2, 3, 4]
    assert startup.process_age_s() > 0
