"""A failed shot's entry holds the provider's error as data: code, HTTP status, its own words."""

from __future__ import annotations

import json

from imgbatch.errors import PermanentError, RateLimited
from imgbatch.run.entries import failed_entry
from imgbatch.shots.expand import Shot
from imgbatch.shots.request import ImageRequest
from imgbatch.state.results import ResultEntry

SHOT = Shot("s01", ImageRequest(prompt="a red bicycle"), "s01.png")


def test_the_service_s_answer_as_such_is_kept_in_parts() -> None:
    refused = PermanentError(
        "Input data may contain inappropriate content.", status=400, code="DataInspectionFailed"
    )
    entry = failed_entry(SHOT, str(refused), refused, 1)
    assert entry.error == "400 DataInspectionFailed: Input data may contain inappropriate content."
    assert (entry.error_status, entry.error_code) == (400, "DataInspectionFailed")
    assert entry.error_message == "Input data may contain inappropriate content."
    line = entry.to_json()
    assert line["error_status"] == 400
    assert ResultEntry.from_json(json.loads(json.dumps(line))) == entry


def test_words_the_run_wraps_around_it_are_not_the_service_s() -> None:
    throttled = RateLimited("Too many requests.", code="Throttling")
    entry = failed_entry(
        SHOT, f"the service refused it for 300 s (40 tries): {throttled}", throttled, 40
    )
    assert (entry.error_status, entry.error_code, entry.error_message) == (429, "Throttling", None)


def test_an_entry_without_a_provider_error_is_written_as_before() -> None:
    entry = failed_entry(SHOT, "the image could not be placed", None, 1)
    line = entry.to_json()
    assert "error_status" not in line and "error_message" not in line
    assert line["error"] == "the image could not be placed"
