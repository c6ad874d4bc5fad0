"""The hub's status page: boards, signal quality, last values, live ECG and
pleth, backlog per backend, rejects and alerts; French and English.

Served by the agent on the local network only (clients outside loopback,
private and link-local addresses are refused) and behind authentication
(HTTP Basic, the password read from a file readable by the service only;
no password file, no page: there are no default credentials). The page
polls two small JSON endpoints once a second and draws on canvases, so it
reads well on a phone.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.errors import PulsebridgeError
from agent.store import StoreError, check_private

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _local(addr: str | None) -> bool:
    if not addr:
        return False
    try:
        ip = ipaddress.ip_address(addr.split("%")[0])
    except ValueError:
        return False
    return bool(ip.is_loopback or ip.is_private or ip.is_link_local)


# Shorter passwords fall to a guessing run on the local network within hours.
MIN_PASSWORD_CHARS = 12
# A password file is one line; anything larger is not one.
MAX_PASSWORD_FILE_BYTES = 4096


class PasswordFileError(PulsebridgeError):
    """The status page's password file cannot be used; .missing tells absent from unsafe."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def read_password(path: Path) -> str:
    """The status page's password from path (one line, mode 0600, the service's own, at least
    MIN_PASSWORD_CHARS characters); PasswordFileError says why not."""
    try:
        check_private(path, "status page password file")
        if path.stat().st_size > MAX_PASSWORD_FILE_BYTES:
            raise PasswordFileError("status page password file %s is larger than %d bytes: not a password file"
                                    % (path, MAX_PASSWORD_FILE_BYTES))
        password = path.read_text().strip()
    except FileNotFoundError:
        raise PasswordFileError("no status page password file at %s" % path, missing=True) from None
    except StoreError as e:
        raise PasswordFileError(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PasswordFileError("status page password file %s cannot be read: %s" % (path, e)) from None
    if len(password) < MIN_PASSWORD_CHARS or "\n" in password:
        raise PasswordFileError("status page password in %s must be one line of at least %d characters (it has %d)"
                                % (path, MIN_PASSWORD_CHARS, len(password)))
    return password


class StatusPage:
    def __init__(self, snapshot: Callable[[], dict[str, Any]], waveform: Callable[[str, str], dict[str, Any]],
                 password: str, user: str = "hub") -> None:
        self.password = password
        self.user = user
        self.snapshot = snapshot
        self.waveform = waveform
        self.runner: web.AppRunner | None = None

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not _local(request.remote):
            return web.Response(status=403, text="local network only")
        auth = request.headers.get("Authorization", "")
        ok = False
        if auth.startswith("Basic "):
            try:
                user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                ok = hmac.compare_digest(user.encode(), self.user.encode()) and hmac.compare_digest(
                    pw.encode(), self.password.encode())
            except (ValueError, UnicodeDecodeError):
                ok = False
        if not ok:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="pulsebridge hub"'},
                                text="authentication required")
        resp = await handler(request)
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Content-Security-Policy"] = "default-src 'self'; script-src 'unsafe-inline' 'self'; " \
                                                  "style-src 'unsafe-inline' 'self'"
        return resp

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html", charset="utf-8")

    async def api_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def api_wave(self, request: web.Request) -> web.Response:
        return web.json_response(self.waveform(request.query.get("device", ""), request.query.get("stream", "ecg")))

    async def start(self, host: str, port: int) -> int:
        app = web.Application(middlewares=[self.guard])
        app.router.add_get("/", self.index)
        app.router.add_get("/api/status", self.api_status)
        app.router.add_get("/api/wave", self.api_wave)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        return int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


TEXT = {
    "fr": {"title": "Passerelle de télésurveillance", "ok": "Tout fonctionne.", "warn": "À vérifier :",
           "boards": "Capteur", "connected": "connecté", "searching": "non branché", "backoff": "reconnexion",
           "connecting": "connexion en cours", "out_of_range": "hors de portée",
           "stalled": "branché, mais plus rien ne nous parvient : la passerelle réessaie",
           "released": "appareil branché qui n'est pas un capteur enregistré : laissé libre",
           "retry": "nouvel essai dans", "restarted": "redémarrée", "times": "fois",
           "task": "Tâche interne", "stuck": "La passerelle ne répond plus bien : elle va redémarrer d'elle-même.",
           "dropped": "messages mis de côté (le capteur les renverra)",
           "bt_down": "Le Bluetooth de la passerelle ne répond pas : débranchez-la puis rebranchez-la.",
           "last": "dernière mesure il y a", "never": "aucune mesure pour l'instant", "s": "s",
           "hr": "Fréquence cardiaque", "spo2": "Saturation en oxygène", "pr": "Pouls", "quality": "qualité du signal",
           "backends": "Envoi à l'équipe soignante", "backlog": "en attente d'envoi", "sent": "envoyées",
           "alerts": "Alertes", "none": "aucune", "rejects": "Trames refusées", "ecg": "ECG", "pleth": "Pouls (pléth)",
           "lang": "English", "spo2_low": "oxygène bas", "heart_rate_out_of_range": "rythme cardiaque inhabituel",
           "lead_off": "électrode décollée", "board_silent": "capteur silencieux",
           "store_fault": "La passerelle ne peut plus enregistrer (carte pleine ?) : les mesures attendent sur les "
                          "capteurs ; libérez de la place.",
           "store_recovered": "Le stockage de la passerelle était endommagé ; il a été reconstruit.",
           "store_short": "La passerelle manque de place : elle efface des mesures pas encore envoyées ; libérez de "
                          "la place."},
    "en": {"title": "Home monitoring hub", "ok": "Everything is working.", "warn": "Needs a look:",
           "boards": "Sensor", "connected": "connected", "searching": "not plugged in", "backoff": "reconnecting",
           "connecting": "connecting", "out_of_range": "out of range",
           "stalled": "plugged in, but nothing is coming through: the hub keeps trying",
           "released": "a device that is not a registered sensor: left alone",
           "retry": "next try in", "restarted": "restarted", "times": "times",
           "task": "Internal task", "stuck": "The hub is not responding well: it will restart by itself.",
           "dropped": "messages set aside (the sensor will send them again)",
           "bt_down": "The hub's Bluetooth is not answering: unplug the hub, then plug it back in.",
           "last": "last reading", "never": "no reading yet", "s": "s ago",
           "hr": "Heart rate", "spo2": "Oxygen saturation", "pr": "Pulse", "quality": "signal quality",
           "backends": "Sending to the care team", "backlog": "waiting to be sent", "sent": "sent",
           "alerts": "Alerts", "none": "none", "rejects": "Refused frames", "ecg": "ECG", "pleth": "Pulse (pleth)",
           "lang": "Français", "spo2_low": "low oxygen", "heart_rate_out_of_range": "unusual heart rate",
           "lead_off": "electrode off", "board_silent": "sensor silent",
           "store_fault": "The hub cannot store readings (card full?): they wait on the sensors; free some space.",
           "store_recovered": "The hub's storage was damaged; it has been rebuilt.",
           "store_short": "The hub is short of space: it deletes readings not yet sent; free some space."},
}

PAGE = """<!doctype html>
<html lang="fr"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pulsebridge</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2733;font-size:18px}
header{background:#2f6f8f;color:#fff;padding:14px 18px;display:flex;justify-content:space-between;align-items:center}
h1{font-size:20px;margin:0}button{font-size:16px;border:0;border-radius:6px;padding:6px 10px}
main{padding:12px;max-width:900px;margin:auto}
.card{background:#fff;border-radius:10px;padding:14px;margin:10px 0;box-shadow:0 1px 3px #0002}
#summary{font-size:22px;font-weight:600}.ok{color:#1c7c3c}.warn{color:#a15c00}
.values{display:flex;gap:18px;flex-wrap:wrap;margin:8px 0}.v b{font-size:26px}
canvas{width:100%;height:90px;background:#fbfcfd;border:1px solid #dde3e8;border-radius:6px}
small{color:#5a6876}
</style></head><body>
<header><h1 id="title"></h1><button id="lang"></button></header>
<main><div class="card"><div id="summary"></div></div>
<div id="boards"></div>
<div class="card"><h2 id="backends-title"></h2><div id="backends"></div></div>
<div class="card"><h2 id="alerts-title"></h2><div id="alerts"></div>
<p><small id="rejects"></small></p><p><small id="tasks"></small></p></div></main>
<script>
const TEXT = __TEXT__;
let lang = (navigator.language || "fr").startsWith("fr") ? "fr" : "en";
const t = k => TEXT[lang][k] || k;
document.getElementById("lang").onclick = () => { lang = lang === "fr" ? "en" : "fr"; render(last); };
let last = null;
function draw(canvas, values, color) {
  const c = canvas.getContext("2d"), w = canvas.width = canvas.clientWidth, h = canvas.height = canvas.clientHeight;
  c.clearRect(0, 0, w, h);
  if (!values || values.length < 2) return;
  let lo = Math.min(...values), hi = Math.max(...values); if (hi === lo) hi = lo + 1;
  c.strokeStyle = color; c.lineWidth = 1.5; c.beginPath();
  values.forEach((v, i) => { const x = i * w / (values.length - 1), y = h - 4 - (v - lo) * (h - 8) / (hi - lo);
    i ? c.lineTo(x, y) : c.moveTo(x, y); });
  c.stroke();
}
function render(s) {
  if (!s) return;
  document.documentElement.lang = lang;
  document.getElementById("title").textContent = t("title");
  document.getElementById("lang").textContent = t("lang");
  const btDown = s.ble_adapter && s.ble_adapter.state === "down";
  const stuck = s.systemd && !s.systemd.alive;
  const store = s.store || {}, storeFault = store.state === "fault", recovered = !!store.recovery;
  const storeShort = !storeFault && !!store.short_of_space;
  // A device that is not ours (a modem, a board being set up) is shown, not counted as a problem.
  const problems = s.boards.filter(b => b.state !== "connected" && b.state !== "released").length +
    s.vitals.active_alerts.length + (btDown ? 1 : 0) + (stuck ? 1 : 0) + (storeFault ? 1 : 0) + (recovered ? 1 : 0) +
    (storeShort ? 1 : 0);
  const sum = document.getElementById("summary");
  sum.textContent = problems ? t("warn") + " " + problems + (btDown ? " — " + t("bt_down") : "") +
    (stuck ? " — " + t("stuck") : "") + (storeFault ? " — " + t("store_fault") : "") +
    (recovered ? " — " + t("store_recovered") : "") + (storeShort ? " — " + t("store_short") : "") : t("ok");
  sum.className = problems ? "warn" : "ok";
  const boards = document.getElementById("boards");
  s.boards.forEach((b, i) => {
    let card = document.getElementById("board" + i);
    if (!card) { card = document.createElement("div"); card.className = "card"; card.id = "board" + i;
      card.innerHTML = '<h2 class="name"></h2><div class="state"></div><div class="values"></div>' +
        '<small class="ecg-t"></small><canvas class="ecg"></canvas><small class="pleth-t"></small>' +
        '<canvas class="pleth"></canvas>'; boards.appendChild(card); }
    card.querySelector(".name").textContent = t("boards") + " " + (b.device_id || b.port || "?");
    const age = b.last_frame_at ? Math.round(Date.now() / 1000 - b.last_frame_at) : null;
    const retry = b.retry_in_s !== null && b.retry_in_s !== undefined && b.state !== "searching" ?
      " (" + t("retry") + " " + Math.round(b.retry_in_s) + " s)" : "";
    const dropped = (b.discarded || {}).overflow || 0;
    card.querySelector(".state").textContent = t(b.state) + retry + " — " +
      (age === null ? t("never") : t("last") + " " + age + " " + t("s")) +
      (dropped ? " — " + dropped + " " + t("dropped") : "");
    const v = (s.last_vitals || {})[b.device_id] || {};
    const show = (k, label, unit) => v[k] ? '<div class="v">' + t(label) + '<br><b>' + v[k].value + '</b> ' + unit +
      '<br><small>' + t("quality") + ' ' + Math.round(100 * v[k].quality) + ' %</small></div>' : "";
    card.querySelector(".values").innerHTML = show("heart_rate", "hr", "/min") + show("spo2", "spo2", "%") +
      show("pulse_rate", "pr", "/min");
    card.querySelector(".ecg-t").textContent = t("ecg"); card.querySelector(".pleth-t").textContent = t("pleth");
  });
  document.getElementById("backends-title").textContent = t("backends");
  document.getElementById("backends").innerHTML = s.backends.map(f => "<p>" + f.name + " — " + f.backlog + " " +
    t("backlog") + ", " + f.forwarded + " " + t("sent") + "</p>").join("");
  document.getElementById("alerts-title").textContent = t("alerts");
  const al = s.vitals.active_alerts;
  document.getElementById("alerts").textContent =
    al.length ? al.map(a => a[0] + ": " + t(a[1])).join(", ") : t("none");
  const nrej = Object.values(s.rejects).reduce((a, b) => a + b, 0);
  document.getElementById("rejects").textContent = t("rejects") + " : " + nrej;
  document.getElementById("tasks").textContent = Object.entries(s.tasks || {}).filter(([, v]) => v.restarts)
    .map(([k, v]) => t("task") + " " + k + " " + t("restarted") + " " + v.restarts + " " + t("times")).join(" · ");
}
async function tick() {
  try {
    const r = await fetch("api/status"); last = await r.json(); render(last);
    for (let i = 0; i < last.boards.length; i++) {
      const b = last.boards[i], card = document.getElementById("board" + i); if (!b.device_id || !card) continue;
      for (const [stream, cls, color] of [["ecg", "ecg", "#b3261e"], ["ppg", "pleth", "#2f6f8f"]]) {
        const q = "api/wave?device=" + encodeURIComponent(b.device_id) + "&stream=" + stream;
        const w = await (await fetch(q)).json();
        draw(card.querySelector("canvas." + cls), w.values, color);
      }
    }
  } catch (e) { document.getElementById("summary").textContent = "…"; }
}
tick(); setInterval(tick, 1000);
</script></body></html>
""".replace("__TEXT__", json.dumps(TEXT))
