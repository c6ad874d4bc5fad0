// The hub's status page. It polls api/status once a second and shows what the
// hub derived (agent/status_page.py: view); what only this script can know is
// that the hub stopped answering: after HUB_LOST_S without an answer it says
// so, with the time of the last contact, and stops showing values as live.
// Every text is set with textContent (a room label is never markup).
"use strict";
const POLL_MS = 1000;
const POLL_TIMEOUT_MS = 5000; // a hub that hangs must not hang the poll
const HUB_LOST_S = 10;
const loadedAt = Date.now();
let TEXT = null;
let lang = (navigator.language || "fr").toLowerCase().startsWith("fr") ? "fr" : "en";
let last = null; // the last answer of api/status
let lastAt = null; // Date.now() when it came
let announced = "";
const $ = id => document.getElementById(id);
const locale = () => (lang === "fr" ? "fr-FR" : "en-GB");

function t(key, args) {
  let s = (TEXT && TEXT[lang][key]) || key;
  for (const [k, v] of Object.entries(args || {})) s = s.split("{" + k + "}").join(String(v));
  return s;
}
function hubNow() { return last.now + (Date.now() - lastAt) / 1000; }
function dur(s) {
  s = Math.max(0, Math.round(s));
  if (s < 60) return t("u_s", {n: s});
  if (s < 3600) return t("u_min", {n: Math.floor(s / 60)});
  if (s < 172800) return t("u_h", {n: Math.floor(s / 3600), m: Math.floor((s % 3600) / 60)});
  return t("u_d", {n: Math.floor(s / 86400)});
}
function clock(at) { // a time of day (with the date when it is not today's)
  const d = new Date(at * 1000), opts = {hour: "2-digit", minute: "2-digit"};
  if (new Date().toDateString() !== d.toDateString()) { opts.day = "numeric"; opts.month = "short"; }
  return d.toLocaleString(locale(), opts);
}
function num(x) { return Math.round(x).toLocaleString(locale()); }
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function noticeText(n) {
  const a = Object.assign({}, n.args);
  if (a.since_at !== undefined && a.since_at !== null) { a.time = clock(a.since_at); a.age = dur(hubNow() - a.since_at); }
  if (a.waiting !== undefined) a.waiting = num(a.waiting);
  if ("value" in a) a.value = a.value === null || a.value === undefined ? "—" : num(a.value);
  const key = TEXT[lang][n.key] ? n.key : "alert_other";
  let s = t(key, a);
  if (a.link && TEXT[lang]["hint_" + a.link]) s += " " + t("hint_" + a.link);
  return s;
}

function renderStatus(lost) {
  const box = $("status"), list = $("notices");
  let level, head, items = [];
  if (lost) {
    level = "lost"; head = t("head_hub_lost");
    items.push({level: "alert", text: lastAt === null ? t("hub_never") :
      t("hub_lost", {time: new Date(lastAt).toLocaleTimeString(locale(), {hour: "2-digit", minute: "2-digit",
        second: "2-digit"}), age: dur((Date.now() - lastAt) / 1000)})});
  } else if (last) {
    level = last.level;
    head = level === "alert" ? t("head_alert") : level === "attention" ? t("head_attention") :
      last.delivery === "none" ? t("head_ok_kept") : t("head_ok_sent");
    items = last.notices.map(n => ({level: n.level, text: noticeText(n), key: n.key + (n.args.label || "")}));
  } else {
    return;
  }
  box.className = "card level-" + level;
  $("headline").textContent = head;
  list.replaceChildren(...items.map(i => el("li", i.level, i.text)));
  // Announced to screen readers when what is wrong changes, not as the ages tick.
  const what = level + "|" + items.map(i => i.key || i.text).join("|");
  if (what !== announced) {
    announced = what;
    // Alerts (and a hub that stopped answering) interrupt a screen reader; the rest waits its turn.
    const urgent = items.filter(i => i.level === "alert").map(i => i.text).join(" ");
    $("announce-alert").textContent = urgent;
    $("announce").textContent = urgent ? "" : head + ". " + items.filter(i => i.level !== "info")
      .map(i => i.text).join(" ");
  }
}

function sensorCard(i) {
  let card = $("sensor" + i);
  if (card) return card;
  card = el("section", "card sensor");
  card.id = "sensor" + i;
  card.append(el("h2", "name"), el("p", "state"), el("div", "values"));
  for (const stream of ["ecg", "ppg"]) {
    const fig = el("figure", "wave-" + stream), cap = el("figcaption", "caption"), canvas = el("canvas", stream);
    canvas.setAttribute("role", "img");
    fig.append(cap, canvas);
    card.append(fig);
  }
  $("sensors").append(card);
  return card;
}

function renderSensors(lost) {
  const sensors = last ? last.sensors : [];
  sensors.forEach((s, i) => {
    const card = sensorCard(i), live = !lost && s.state === "live";
    card.dataset.device = s.device_id;
    card.dataset.live = live ? "1" : "";
    card.querySelector(".name").textContent = s.label;
    const st = card.querySelector(".state");
    st.className = "state " + (lost ? "stale" : s.state);
    st.textContent = lost ? t("not_live", {time: new Date(lastAt).toLocaleTimeString(locale(),
      {hour: "2-digit", minute: "2-digit"})}) :
      s.state === "live" ? t("live", {age: dur(hubNow() - s.heard_at)}) :
      s.state === "silent" ? t("silent", {time: clock(s.heard_at), age: dur(hubNow() - s.heard_at)}) : t("waiting");
    const values = [];
    for (const [kind, label] of [["heart_rate", "hr"], ["spo2", "spo2"], ["pulse_rate", "pr"]]) {
      const v = s.vitals[kind];
      if (!v) continue;
      const unit = kind === "spo2" ? "%" : t("per_min");  // after a no-break space
      const box = el("div", "v" + (v.out ? " out" : "") + (live ? "" : " stale"));
      box.append(el("span", "", t(label)), el("br"), el("b", "", num(v.value)), "\u00a0" + unit);
      if (v.out) {
        const limit = v.out === "low" ? v.low : v.high;
        box.append(el("span", "limit", t("out_" + v.out, {limit: num(limit) + (kind === "spo2" ? "\u00a0%" : "")})));
      }
      const q = v.disagrees ? "q_disagree" : v.quality >= 0.8 ? "q_good" : v.quality >= 0.5 ? "q_fair" : "q_poor";
      // Not live: the line above the values says so. After the limit (a block), no line break.
      if (live) box.append(...(v.out ? [] : [el("br")]), el("small", "", t(q)));
      values.push(box);
    }
    card.querySelector(".values").replaceChildren(...values);
    const hr = s.vitals.heart_rate, pr = s.vitals.pulse_rate;
    for (const [stream, rate] of [["ecg", hr], ["ppg", pr]]) {
      const canvas = card.querySelector("canvas." + stream), drawn = live && canvas.dataset.drawn;
      if (!live) draw(canvas, []); // a trace that is not live is not shown
      canvas.hidden = !drawn;
      card.querySelector(".wave-" + stream + " figcaption").textContent = t(stream) + (drawn ? "" :
        " — " + t("wave_none"));
      canvas.setAttribute("aria-label", t(stream + "_alt") + (rate ? ", " + t("wave_rate", {value: num(rate.value)}) :
        ""));
    }
  });
  const box = $("sensors");
  while (box.children.length > sensors.length) box.lastChild.remove();
}

function renderDetails() {
  $("details-title").textContent = t("details");
  if (!last) return;
  const lines = last.details.map(d => {
    const a = d.args;
    if (d.key === "d_link") {
      let s = t("d_link", {where: a.where, state: t("st_" + a.state)});
      if (a.device_id) s += " — " + t("d_device", {device: a.device_id});
      if (a.firmware) s += " — " + t("d_firmware", {firmware: a.firmware});
      const up = a.update;
      if (up && TEXT[lang]["d_up_" + up.phase]) {
        s += " — " + t("d_up_" + up.phase, {pct: up.pct === null ? "…" : num(up.pct), version: up.version,
                                              reason: up.reason});
      }
      if (a.retry_in_s !== null && a.retry_in_s !== undefined && a.state !== "searching") {
        s += " — " + t("d_retry", {n: Math.round(a.retry_in_s)});
      }
      if (a.set_aside) s += " — " + t("d_set_aside", {n: num(a.set_aside)});
      return s;
    }
    if (d.key === "d_backend") {
      return t("d_backend", {name: a.name, waiting: num(a.waiting), sent: num(a.sent)}) + (a.error ? " — " + a.error : "");
    }
    return t(d.key, Object.fromEntries(Object.entries(a).map(([k, v]) => [k, typeof v === "number" ? num(v) : v])));
  });
  $("details").replaceChildren(...lines.map(s => el("li", "", s)));
}

function render() {
  const lost = Date.now() - (lastAt === null ? loadedAt : lastAt) > HUB_LOST_S * 1000;
  if (!TEXT) { // the words never came: the hub stopped answering before its first answer
    if (lost) {
      $("status").className = "card level-lost";
      $("headline").textContent = "La passerelle ne répond pas. — The hub is not answering.";
    }
    return;
  }
  document.documentElement.lang = lang;
  document.title = t("title");
  $("title").textContent = t("title");
  $("lang").textContent = t("lang");
  $("lang").lang = lang === "fr" ? "en" : "fr";
  renderStatus(lost);
  renderSensors(lost);
  renderDetails();
}

function draw(canvas, values) {
  const c = canvas.getContext("2d"), w = canvas.width = canvas.clientWidth, h = canvas.height = canvas.clientHeight;
  c.clearRect(0, 0, w, h);
  canvas.dataset.drawn = "";
  if (!values || values.length < 2) return;
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi === lo) hi = lo + 1;
  c.strokeStyle = canvas.classList.contains("ecg") ? "#b3261e" : "#2f6f8f";
  c.lineWidth = 1.5;
  c.beginPath();
  values.forEach((v, i) => {
    const x = i * w / (values.length - 1), y = h - 4 - (v - lo) * (h - 8) / (hi - lo);
    if (i) c.lineTo(x, y); else c.moveTo(x, y);
  });
  c.stroke();
  canvas.dataset.drawn = "1";
}

async function getJson(url) {
  const ctl = new AbortController(), timer = setTimeout(() => ctl.abort(), POLL_TIMEOUT_MS);
  try {
    const r = await fetch(url, {signal: ctl.signal, cache: "no-store"});
    if (!r.ok) throw new Error(url + ": HTTP " + r.status);
    return await r.json();
  } finally {
    clearTimeout(timer);
  }
}

async function poll() {
  try {
    if (!TEXT) TEXT = await getJson("api/text");
    last = await getJson("api/status");
    lastAt = Date.now();
    render();
    for (let i = 0; i < last.sensors.length; i++) {
      const s = last.sensors[i], card = $("sensor" + i);
      if (!card || s.state !== "live") continue;
      for (const stream of ["ecg", "ppg"]) {
        const w = await getJson("api/wave?device=" + encodeURIComponent(s.device_id) + "&stream=" + stream);
        if (card.dataset.live) {
          const canvas = card.querySelector("canvas." + stream);
          canvas.hidden = false; // drawn at its width, then shown as render() decides
          draw(canvas, w.values);
        }
      }
    }
  } catch (e) {
    // No answer: render() below tells it once HUB_LOST_S has passed since the last one.
  }
  render();
  setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("lang").addEventListener("click", () => { lang = lang === "fr" ? "en" : "fr"; render(); });
  setInterval(render, POLL_MS); // ages go on, and a hub that stopped answering is noticed, between polls
  poll();
});
