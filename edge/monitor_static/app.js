// CytoEdge monitor page: server-sent events in, small JSON POSTs out. No framework, no build step.
"use strict";

const COLOURS = { accepted: "#1a9850", review: "#f59e0b", abnormal: "#d7191c" };
const S = { classes: [], labels: [], alertLabels: [], slide: null, session: null, target: 100 };
const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
};
const qs = (slide) => (slide ? "?slide=" + encodeURIComponent(slide) : "");

// ---- operator name (kept in the browser) ----
$("operator").value = localStorage.getItem("cytoedge.operator") || "";
$("operator").addEventListener("change", () => localStorage.setItem("cytoedge.operator", $("operator").value.trim()));
const operator = () => $("operator").value.trim();

// ---- live frame with boxes ----
const canvas = $("frame");
const ctx = canvas.getContext("2d");
let drawing = false;

function drawFrame(ev) {
  if (drawing) return; // a slow machine skips frames rather than queueing them
  drawing = true;
  const img = new Image();
  img.onload = () => {
    if (canvas.width !== ev.w || canvas.height !== ev.h) { canvas.width = ev.w; canvas.height = ev.h; }
    ctx.drawImage(img, 0, 0, ev.w, ev.h);
    const cells = ev.cells || [];
    const lw = Math.max(2, Math.round(ev.w / 320));
    ctx.font = `${Math.max(12, Math.round(ev.w / 45))}px sans-serif`;
    ctx.textBaseline = "bottom";
    for (const c of cells) {
      const [x0, y0, x1, y1] = c.box;
      const col = COLOURS[c.state] || "#888";
      ctx.lineWidth = lw; ctx.strokeStyle = col;
      ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
      const text = `${c.label} ${(100 * c.p).toFixed(0)}%`;
      const tw = ctx.measureText(text).width + 6;
      const th = parseInt(ctx.font, 10) + 4;
      const ty = y0 - th < 0 ? y1 + th : y0;
      ctx.fillStyle = col; ctx.fillRect(x0 - lw / 2, ty - th, tw, th);
      ctx.fillStyle = "#fff"; ctx.fillText(text, x0 + 3, ty - 2);
    }
    canvas.dataset.seq = ev.seq;
    canvas.dataset.slide = ev.slide;
    canvas.dataset.boxes = cells.length;
    $("frame-note").textContent = `${ev.slide} · frame ${ev.seq} · ${cells.length} cell(s)` + (ev.cells ? "" : " · no flags (daemon down?)");
    drawing = false;
  };
  img.onerror = () => { drawing = false; };
  img.src = ev.img;
}

// ---- differential ----
function renderCounts(c) {
  const body = $("diff").querySelector("tbody");
  body.replaceChildren();
  if (!c) { $("progress-text").textContent = ""; return; }
  for (const r of c.rows) {
    const bar = el("div", { class: "bar" }); bar.style.width = Math.min(100, r.pct) + "%";
    const tr = el("tr", { "data-class": r.label, class: S.alertLabels.includes(r.label) && r.n ? "alerting" : "" },
      el("td", { text: r.label }), el("td", { class: "n", text: String(r.n) }),
      el("td", { class: "pct", text: r.pct.toFixed(1) }), el("td", { class: "barcell" }, bar));
    body.append(tr);
  }
  const target = c.target || S.target;
  $("progress-text").textContent = `${c.wbc} / ${target} white cells` + (c.wbc >= target ? " - complete" : "");
  $("progress-text").dataset.wbc = c.wbc;
  $("progress-bar").style.width = Math.min(100, (100 * c.wbc) / target) + "%";
  $("progress-bar").classList.toggle("done", c.wbc >= target);
  const extra = c.per_100_wbc.filter((r) => r.n).map((r) => `${r.label} ${r.n}` + (r.per100 == null ? "" : ` (${r.per100.toFixed(1)}/100 WBC)`));
  for (const [k, n] of Object.entries(c.not_counted || {})) extra.push(`${k} ${n} (not counted)`);
  extra.push(`${c.pending} pending review`, `${c.abnormal} flagged abnormal`, `${c.total} cells found`);
  $("diff-extra").textContent = extra.join(" · ");
  $("diff").dataset.total = c.total;
  $("diff").dataset.pending = c.pending;
}

// ---- review queue ----
async function loadReview() {
  const r = await fetch("/api/review" + qs(S.slide));
  if (r.ok) renderReview(await r.json());
}

function renderReview(cells) {
  // The queue is re-rendered on every "review" event (new cells, new views of a cell, anyone's decision). A card
  // whose cell did not change is kept as it is; a rebuilt card keeps the label the operator picked in its menu,
  // so a refresh between picking and clicking Reclassify cannot change what is sent.
  const q = $("queue");
  const shown = new Map([...q.children].map((card) => [card.dataset.cellId, card]));
  $("review-count").textContent = cells.length;
  q.replaceChildren(...cells.map((c) => {
    const old = shown.get(c.id);
    if (old && old.dataset.sig === cardSig(c)) return old;
    const card = reviewCard(c);
    const picked = old && old.querySelector("select.relabel[data-touched]");
    if (picked) {
      const select = card.querySelector("select.relabel");
      select.value = picked.value; select.dataset.touched = "1";
    }
    return card;
  }));
}

const cardSig = (c) => [c.label, c.state, c.has_crop, ...c.top.map(([k, p]) => k + p.toFixed(3))].join("|");

function reviewCard(c) {
  const select = el("select", { class: "relabel", "aria-label": "new label" });
  for (const l of S.labels) {
    const o = el("option", { value: l, text: l });
    if (c.top.length > 1 && l === c.top[1][0]) o.selected = true;
    select.append(o);
  }
  select.onchange = () => { select.dataset.touched = "1"; };
  const confirm = el("button", { class: "confirm", type: "button", text: `Confirm ${c.label}` });
  const reclass = el("button", { class: "reclassify", type: "button", text: "Reclassify" });
  confirm.onclick = () => decide(c, "confirm", null, card);
  reclass.onclick = () => decide(c, "reclassify", select.value, card);
  const img = c.has_crop ? el("img", { src: "/api/crop?id=" + encodeURIComponent(c.id), alt: "cell " + c.id, width: "128", height: "128" })
    : el("div", { class: "nocrop", text: "no crop" });
  const top = c.top.map(([k, p]) => `${k} ${(100 * p).toFixed(0)}%`).join(", ");
  const card = el("div", { class: `card ${c.state}`, "data-cell-id": c.id, "data-sig": cardSig(c) },
    img,
    el("div", { class: "info" },
      el("div", { class: "cid", text: `${c.id}` }),
      el("div", { class: "state", text: c.state + (c.reason ? ` · ${c.reason}` : "") }),
      el("div", { class: "top", text: top }),
      el("div", { class: "anom", text: `anomaly ${c.anomaly.toPrecision(3)}` })),
    el("div", { class: "actions" }, confirm, el("span", {}, select, reclass)));
  return card;
}

async function decide(cell, decision, label, card) {
  const err = $("review-error");
  if (!operator()) { err.hidden = false; err.textContent = "Enter your name (Operator, top right) before deciding."; $("operator").focus(); return; }
  card.classList.add("busy");
  const r = await fetch("/api/decision", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ cell_id: cell.id, decision, label, operator: operator() }),
  });
  const body = await r.json();
  if (!r.ok) { card.classList.remove("busy"); err.hidden = false; err.textContent = body.error || r.statusText; return; }
  err.hidden = true;
  card.remove();
  $("review-count").textContent = $("queue").children.length;
  if (body.counts && body.cell.slide === S.slide) renderCounts(body.counts);
}

// ---- alerts ----
const seenAlerts = new Set();
function addAlert(c, flash) {
  if (seenAlerts.has(c.id)) return;
  seenAlerts.add(c.id);
  const what = c.state === "abnormal" ? `abnormal cell (${c.label}?)` : `${c.label}`;
  const li = el("li", { class: c.state, "data-cell-id": c.id }, el("b", { text: what }),
    el("span", { class: "muted", text: ` ${c.id} · p ${(100 * c.p).toFixed(0)}% · ${new Date(c.t_ns / 1e6).toLocaleTimeString()}` }));
  $("alerts").prepend(li);
  $("alert-count").textContent = seenAlerts.size;
  if (flash) {
    const b = $("alert-banner");
    b.textContent = `Alert: ${what} on slide ${c.slide || S.slide} (${c.id}) - review it`;
    b.hidden = false;
    clearTimeout(addAlert.timer);
    addAlert.timer = setTimeout(() => { b.hidden = true; }, 8000);
  }
}

// ---- slide ----
function renderSlide() {
  $("slide-id").textContent = S.slide || "-";
  const s = S.session;
  $("session-info").textContent = s ? `started by ${s.operator} · target ${s.target}` : "not started (following the camera)";
  $("start").disabled = false;
  $("stop").disabled = !s;
  if (!$("slide-input").value && S.slide) $("slide-input").value = S.slide;
  $("report-link").href = "/report" + qs(S.slide);
  $("csv-link").href = "/report.csv" + qs(S.slide);
  $("export-link").href = "/export.zip" + qs(S.slide);
}

$("start-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const err = $("review-error");
  const r = await fetch("/api/slide/start", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ slide: $("slide-input").value.trim(), operator: operator(), target: parseInt($("target").value, 10) }) });
  const body = await r.json();
  if (!r.ok) { err.hidden = false; err.textContent = body.error; return; }
  err.hidden = true;
});
$("stop").addEventListener("click", async () => {
  await fetch("/api/slide/stop", { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
});

// ---- status ----
function renderStatus(st) {
  $("st-camera").className = "pill " + (st.camera ? "up" : "down");
  $("st-daemon").className = "pill " + (st.daemon ? "up" : "down");
  const bits = [];
  if (st.latency_ms != null && st.daemon) bits.push(`${Math.round(st.latency_ms)} ms`);
  if (st.dropped) bits.push(`${st.dropped} dropped`);
  if (st.camera_slide && S.slide && st.camera_slide !== S.slide) bits.push(`camera sends slide ${st.camera_slide}`);
  if (st.feed_error) bits.push(`feed stopped: ${st.feed_error}`);
  $("st-latency").textContent = bits.join(" · ");
}

// ---- wiring ----
function applyState(st) {
  S.classes = st.classes; S.labels = st.labels; S.alertLabels = st.alert_labels;
  S.slide = st.slide; S.session = st.session; S.target = st.target;
  $("target").value = String(st.target);
  renderSlide(); renderCounts(st.counts); renderReview(st.review); renderStatus(st.status);
  for (const c of st.alerts.slice().reverse()) addAlert(c, false);
}

const es = new EventSource("/events");
es.addEventListener("hello", (m) => applyState(JSON.parse(m.data)));
es.addEventListener("frame", (m) => drawFrame(JSON.parse(m.data)));
es.addEventListener("status", (m) => renderStatus(JSON.parse(m.data)));
es.addEventListener("counts", (m) => {
  const c = JSON.parse(m.data);
  if (c && c.slide !== S.slide) { S.slide = c.slide; renderSlide(); }
  renderCounts(c);
});
es.addEventListener("review", () => loadReview());
es.addEventListener("alert", (m) => addAlert(JSON.parse(m.data), true));
es.addEventListener("slide", async () => {
  const r = await fetch("/api/state");
  if (r.ok) applyState(await r.json());
});
es.addEventListener("flags", (m) => {
  const f = JSON.parse(m.data);
  $("st-latency").dataset.seq = f.seq;
});
es.onerror = () => { $("st-camera").className = "pill down"; $("st-daemon").className = "pill down"; };
