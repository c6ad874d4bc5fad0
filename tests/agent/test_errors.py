# One root for the agent's errors, with fields (issue 13, §4; STYLE.md 4): every
# exception class the agent defines is a PulsebridgeError, and what an error is
# about (backend, device, rows, HTTP status) is in its fields, not only in its text.
from __future__ import annotations

import ast
import asyncio
import importlib
from pathlib import Path

import pytest

from agent.errors import PulsebridgeError
from tests.conftest import ROOT


def _exception_classes() -> list[type[BaseException]]:
    found = []
    for path in sorted((ROOT / "agent").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                cls = getattr(importlib.import_module(module), node.name)
                if isinstance(cls, type) and issubclass(cls, BaseException):
                    found.append(cls)
    return found


def test_every_agent_error_is_a_pulsebridge_error() -> None:
    classes = _exception_classes()
    assert len(classes) >= 10, classes  # the scan found them (config, store, registry, transports, ...)
    assert [c.__qualname__ for c in classes if not issubclass(c, PulsebridgeError)] == []


def test_a_refusal_carries_backend_rows_and_http_status() -> None:
    from agent.forwarders.base import DeliveryError, RefusedError

    e = RefusedError(422, "Bundle.entry[0]: invalid", backend="fhir-main", row_ids=[7, 9])
    assert isinstance(e, DeliveryError) and isinstance(e, PulsebridgeError)
    assert (e.backend, e.row_ids, e.http_status, e.reason) == ("fhir-main", (7, 9), 422, "Bundle.entry[0]: invalid")
    assert e.fields() == {"backend": "fhir-main", "row_ids": [7, 9], "http_status": 422}
    assert str(e) == "HTTP 422: Bundle.entry[0]: invalid"
    assert PulsebridgeError("x").fields() == {}


def test_the_registry_names_the_device_it_refused(tmp_path: Path) -> None:
    from agent.audit import AuditLog
    from agent.registry import Registry

    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    try:
        reg.add("pb-err01")
        with pytest.raises(PulsebridgeError) as e:
            reg.add("pb-err01")
        assert e.value.device_id == "pb-err01" and "already registered" in str(e.value)
    finally:
        reg.close()


def test_a_configuration_error_is_caught_at_the_root(tmp_path: Path) -> None:
    from agent.config import ConfigError, load

    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nretention_days = "a week"\n')
    with pytest.raises(PulsebridgeError) as e:
        load(path)
    assert isinstance(e.value, ConfigError) and e.value.field and e.value.path == path


def test_an_http_backend_says_which_backend_failed_and_what_it_answered() -> None:
    # A real HTTP server answering 503 (busy: retried) then 422 (refused: quarantined).
    import tomllib

    from aiohttp import web

    from agent import config, forwarders
    from agent.forwarders.base import DeliveryError, RefusedError

    async def scenario() -> list[DeliveryError]:
        answers = [503, 422]

        async def answer(request: web.Request) -> web.Response:
            return web.Response(status=answers.pop(0), text="Bundle.entry[0]: not a valid Observation")

        app = web.Application()
        app.router.add_post("/", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        cfg = config.parse(tomllib.loads('[[backend]]\nname = "care-team"\ntype = "webhook"\n'
                                          'url = "http://127.0.0.1:%d/"\ninsecure = true\n' % port))
        fw = forwarders.make(cfg.backends[0], None, "hub", asyncio.Event())  # type: ignore[arg-type]
        errors = []
        try:
            for _ in range(2):
                with pytest.raises(DeliveryError) as e:
                    await fw.post(fw.cfg.url, b"[]", {})  # type: ignore[attr-defined]
                errors.append(e.value)
        finally:
            await fw.close()
            await runner.cleanup()
        return errors

    busy, refused = asyncio.run(scenario())
    assert type(busy) is DeliveryError and (busy.backend, busy.http_status) == ("care-team", 503), busy.fields()
    assert isinstance(refused, RefusedError) and refused.fields() == {"backend": "care-team", "http_status": 422}
    assert refused.reason == "Bundle.entry[0]: not a valid Observation"
