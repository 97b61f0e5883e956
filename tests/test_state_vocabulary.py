"""One vocabulary of job states: every view of state covers every state (SPEC §4, issue 4 point 6).

Each view registers here. A new state in jobs/states.py fails this module until every view
(labels and colours, filters, the command, Django's tasks backend, the diagram) knows it.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest
from django.conf import settings

from jobs.django_tasks import STATUS_OF
from jobs.management.commands.job import ANSI, STATE_CHOICES, state_text
from jobs.models import JobRecord
from jobs.selectors import state_filter
from jobs.states import DISPLAY, STORED_STATE_OF, DisplayState, State, colour, display_state, label

ALL_DISPLAY = list(DisplayState)
ALL_STORED = list(State)


def test_every_stored_state_is_also_a_display_state() -> None:
    assert {s.value for s in State} <= {d.value for d in DisplayState}
    assert {d.value for d in DisplayState} - {s.value for s in State} == {"scheduled", "retrying"}


@pytest.mark.parametrize("state", ALL_DISPLAY)
def test_every_display_state_has_a_label_a_colour_and_a_stored_state(state: DisplayState) -> None:
    assert state in DISPLAY
    assert label(state)
    assert colour(state) in ANSI
    assert STORED_STATE_OF[state] in State


def test_labels_are_distinct() -> None:
    labels = [label(s) for s in ALL_DISPLAY]
    assert len(set(labels)) == len(labels)


def test_display_state_reaches_every_display_state() -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    future, past = now + dt.timedelta(minutes=5), now - dt.timedelta(minutes=5)
    reached = {display_state(s, scheduled_at=past, attempts=0, now=now) for s in State}
    reached.add(display_state(State.TODO, scheduled_at=future, attempts=0, now=now))
    reached.add(display_state(State.TODO, scheduled_at=future, attempts=1, now=now))
    assert reached == set(DisplayState)
    assert display_state(State.TODO, scheduled_at=None, attempts=0, now=now) == DisplayState.TODO
    assert display_state(State.TODO, scheduled_at=past, attempts=2, now=now) == DisplayState.RETRYING


def test_the_job_record_accepts_every_stored_state() -> None:
    choices = {value for value, _ in JobRecord._meta.get_field("state").choices or []}
    assert choices == {s.value for s in State}


@pytest.mark.parametrize("state", ALL_DISPLAY)
def test_the_job_command_shows_and_filters_every_state(state: DisplayState) -> None:
    assert state_text(state) == label(state)
    assert label(state) in state_text(state, styled=True)
    assert state.value in STATE_CHOICES
    assert state_filter(state)  # the shared list filter (command, API, admin) knows it


@pytest.mark.parametrize("state", ALL_STORED)
def test_django_tasks_map_every_stored_state(state: State) -> None:
    assert state in STATUS_OF


def test_the_diagram_in_docs_draws_every_state() -> None:
    text = (settings.BASE_DIR / "docs" / "jobs.md").read_text()
    diagram = re.search(r"```mermaid\n(.*?)```", text, re.S)
    assert diagram is not None
    for state in ALL_DISPLAY:
        assert re.search(rf"\b{state.value}\b", diagram.group(1)), state


# --- the other views of state: the API, the admin console and the job pages -------------------


def test_the_api_publishes_every_state_in_its_openapi_document() -> None:
    from jobs.api import api

    schemas = api.get_openapi_schema()["components"]["schemas"]
    enums = [set(schema["enum"]) for schema in schemas.values() if "enum" in schema]
    assert {s.value for s in State} in enums
    assert {d.value for d in DisplayState} in enums


@pytest.mark.parametrize("state", ALL_DISPLAY)
def test_the_admin_filters_and_draws_every_display_state(state: DisplayState) -> None:
    from jobs.console.jobs import StateFilter, badge

    assert state.value in {value for value, _ in StateFilter.lookups(None, None, None)}  # type: ignore[arg-type]
    html = badge(state)
    assert f"sl-{colour(state)}" in html
    assert label(state) in html
    css = "".join(p.read_text() for p in (settings.BASE_DIR / "jobs/static/skiplock/admin").glob("*.css"))
    assert f".sl-{colour(state)}" in css


@pytest.mark.parametrize("state", ALL_DISPLAY)
def test_the_job_pages_draw_every_display_state(state: DisplayState) -> None:
    from django.template.loader import render_to_string

    from jobs.templatetags.skiplock_pages import skiplock_state_badge

    html = render_to_string("jobs/components/job_badge.html", skiplock_state_badge(state.value))
    assert label(state) in html
    css = (settings.BASE_DIR / "jobs/static/skiplock/pages/pages.css").read_text()
    assert f".sk-badge--{colour(state)}" in css
