"""The change options are described once (`lrctl.client.ChangeOptions`, `Swap`): both clients'
public signatures take exactly those keyword arguments, with the same defaults, and hand
them on unchanged (no server needed)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import pytest

from lrctl.client import ChangeOptions, Swap, TrainingControlClient, aio, messages, pb, schedules

CLIENTS = [TrainingControlClient, aio.TrainingControlClient]
#: Each method's arguments that are not options: what to change, and the RPC's deadline.
OWN = {"set_learning_rate": {"value"}, "scale_learning_rate": {"factor"},
       "swap_schedule": {"schedule"}, "update": {"decide", "retries"},
       "update_learning_rate": {"fn", "retries"}, "cancel_change": {"request_id", "version"}}


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name != "schedule"}


def _keywords(method: Callable[..., Any]) -> dict[str, Any]:
    params = inspect.signature(method).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize("client", CLIENTS, ids=["sync", "aio"])
@pytest.mark.parametrize("name", sorted(OWN))
def test_the_clients_options_are_the_shared_ones(client: type, name: str) -> None:
    keywords = _keywords(getattr(client, name))
    keywords.pop("timeout")
    for own in OWN[name]:
        keywords.pop(own, None)
    options = _defaults(ChangeOptions)
    if name in ("set_learning_rate", "scale_learning_rate", "swap_schedule"):
        expected = {**options, **(_defaults(Swap) if name == "swap_schedule" else {})}
        assert keywords == expected  # every option, each with its default
    else:  # a part of them, with the same defaults
        assert keywords and all(options[k] == v for k, v in keywords.items()), keywords


def test_the_sync_and_async_signatures_agree() -> None:
    for name in OWN:
        sync, async_ = (inspect.signature(getattr(c, name)) for c in CLIENTS)
        assert sync.parameters.keys() == async_.parameters.keys(), name


def test_every_option_reaches_the_request() -> None:
    options = ChangeOptions(apply_at_step=7, apply_after_steps=None, expected_version=3,
                            expected_run_id="run", expected_incarnation="inc", reason="why",
                            validate_only=True, preview_steps=5, force=True, wait=True,
                            request_id="rid")  # fmt: skip
    swap = Swap(schedules.Constant(0.1), origin="global", schedule_start_step=4, scale=0.5)
    request = messages.change_request(swap, options)
    assert isinstance(request, pb.SwapScheduleRequest)
    assert (request.apply_at_step, request.expected_version, request.expected_run_id,
            request.expected_incarnation, request.reason, request.validate_only,
            request.preview_steps, request.force, request.wait_until_applied,
            request.request_id) == (7, 3, "run", "inc", "why", True, 5, True, True, "rid")  # fmt: skip
    assert not request.HasField("apply_after_steps")  # unset stays unset
    assert (request.origin, request.schedule_start_step, request.scale) == (
        pb.STEP_ORIGIN_GLOBAL, 4, 0.5)
    request = messages.change_request(Swap(schedules.Constant(0.1)), ChangeOptions())
    assert not request.HasField("expected_version") and not request.HasField("scale")
    assert len(request.request_id) == 32  # a fresh UUID4 when none is given


def test_every_option_is_documented_once() -> None:
    for cls in (ChangeOptions, Swap):
        for field in dataclasses.fields(cls):
            if field.name != "schedule":
                assert field.metadata["help"] and field.name in (cls.__doc__ or "")


def test_both_clients_have_the_same_methods_with_the_same_docs() -> None:
    # Described once (`method_docs`): the asyncio client's methods are the sync client's, awaited.
    def methods(cls: type) -> dict[str, str | None]:
        return {name: member.__doc__ for name, member in vars(cls).items()
                if not name.startswith("_") and callable(member)}

    sync, async_ = (methods(c) for c in CLIENTS)
    assert sync == async_
    assert all(doc and doc.strip() for doc in sync.values())
