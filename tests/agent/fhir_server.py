"""A FHIR R4 test server on loopback (HTTPS): what a resend or a bad Bundle
would do to a real one, checked with a real FHIR model library.

Each transaction Bundle is validated with fhir.resources (R4B, the R4
technical correction); conditional creates (If-None-Exist on an identifier)
are honoured; `fail_after_commit` makes it store a batch and then answer
500, as a server that crashed before replying would; `answers` are statuses
answered (one per request, nothing stored) before it serves again, and a
Bundle holding `refuse_identifier` is refused with 422, as a server refuses
what it will never take.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web
from fhir.resources.R4B.bundle import Bundle

from agent.dev.local_backend import serve_https


class FhirTestServer:
    def __init__(self) -> None:
        self.resources: dict[str, dict[str, dict[str, Any]]] = {"Observation": {}, "Device": {}}
        self.invalid: list[str] = []
        self.bundles = 0
        self.fail_after_commit = 0
        self.answers: list[int] = []
        self.refuse_identifier = ""
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def transaction(self, request: web.Request) -> web.Response:
        if self.answers:
            return web.Response(status=self.answers.pop(0), text="injected")
        body = await request.json()
        idents = {e["resource"].get("identifier", [{}])[0].get("value") for e in body.get("entry", [])}
        if self.refuse_identifier and self.refuse_identifier in idents:
            return web.json_response({"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "business-rule", "diagnostics": "will never take "
                 + self.refuse_identifier}]}, status=422)
        try:
            Bundle.model_validate(body)
        except Exception as e:
            self.invalid.append(str(e)[:500])
            return web.json_response({"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "invalid", "diagnostics": str(e)[:200]}]}, status=400)
        if body.get("type") != "transaction":
            return web.Response(status=400, text="not a transaction")
        self.bundles += 1
        out = []
        for entry in body["entry"]:
            res = entry["resource"]
            cond = entry["request"].get("ifNoneExist", "")
            assert cond.startswith("identifier=")
            ident = cond[len("identifier="):]
            table = self.resources[res["resourceType"]]
            if ident in table:
                out.append({"response": {"status": "200 OK"}})
            else:
                table[ident] = res
                out.append({"response": {"status": "201 Created"}})
        if self.fail_after_commit > 0:
            self.fail_after_commit -= 1
            return web.Response(status=500, text="stored, then fell over")
        return web.json_response({"resourceType": "Bundle", "type": "transaction-response", "entry": out},
                                 content_type="application/fhir+json")

    async def start(self, cert: Path, key: Path) -> int:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/fhir", self.transaction)
        self.runner, self.port = await serve_https(app, "127.0.0.1", 0, cert, key)
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


