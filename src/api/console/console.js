// cardbridge helpdesk console. Plain script, no framework, no CDN: it is embedded in the daemon.
// The session token lives in this tab's sessionStorage only; a sign-in code arrives in the URL
// fragment (never sent to a server) and is traded for a session, then dropped from the address.
"use strict";

const KEY = "cardbridge.session";
const state = { token: null, client: "", scopes: [], readers: new Map(), reconciliations: new Map(), last: null, source: null };
const $ = (id) => document.getElementById(id);

const VERDICTS = {
  ok: ["✔", "OK"],
  attention: ["⚠", "Needs attention"],
  critical: ["✖", "Critical"],
  unknown: ["?", "Unknown"],
  reading: ["…", "Reading the card"],
};
const SEVERITY = { info: "ℹ", warning: "⚠", critical: "✖" };
const SCEPMAN = { active: "active", revoked: "revoked", expired: "expired", unknown: "unknown to SCEPman" };

// Bidi controls and other invisible format characters (a card's or a server's text may carry
// them): shown as their code point, so a name can neither reverse nor hide what follows it.
const INVISIBLE = /[\u00AD\u061C\u180E\u200B-\u200F\u202A-\u202E\u2060-\u2064\u2066-\u206F\uFEFF]/g;
function shown(text) {
  return String(text ?? "").replace(INVISIBLE, (c) => `[U+${c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}]`);
}

// Text from a card or a server, in a direction of its own that cannot leak into what follows.
function isolated(text) {
  return el("bdi", {}, shown(text));
}

// An identifier: always drawn left to right, whatever surrounds it.
function ltr(text) {
  return el("bdi", { dir: "ltr", class: "id" }, shown(text));
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return node;
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${state.token}`, ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) { signOut("Your session has ended; sign in again."); throw new Error("signed out"); }
  return response;
}

async function openSession(body) {
  const response = await fetch("/v1/console/session", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error ? answer.error.message : `HTTP ${response.status}`);
  sessionStorage.setItem(KEY, JSON.stringify(answer));
  return answer;
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  if (state.source) state.source.close();
  state.token = null;
  $("station").hidden = true; $("audit").hidden = true; $("sign-in").hidden = false;
  $("sign-in-error").textContent = message || "";
  $("who").textContent = "";
}

// A tab that is signed in never changes who it is signed in as without asking: a page elsewhere
// can send this tab to a sign-in link of its own (login CSRF). The code is traded only if the
// person chooses the link; otherwise it is left unused and expires.
function askToSwitch(saved) {
  $("switch-what").textContent =
    `This tab is signed in as ${shown(saved.client)}. The link you opened would sign it in again, ` +
    "perhaps as someone else. Use it only if you have just run cardbridge console.";
  $("who").textContent = `Signed in as ${shown(saved.client)}`;
  $("sign-in").hidden = true; $("switch").hidden = false;
  $("switch-keep").focus();
  return new Promise((resolve) => {
    const choose = (useLink) => { $("switch").hidden = true; resolve(useLink); };
    $("switch-keep").onclick = () => choose(false);
    $("switch-use").onclick = () => choose(true);
  });
}

async function start() {
  const code = new URLSearchParams(location.hash.slice(1)).get("code");
  // Drop the fragment at once: the address bar and history keep no sign-in code.
  if (location.hash) history.replaceState(null, "", location.pathname);
  let session = null;
  try {
    const saved = JSON.parse(sessionStorage.getItem(KEY) || "null");
    const useLink = code && (!saved || await askToSwitch(saved));
    session = useLink ? await openSession({ code }) : saved;
  } catch (e) {
    signOut(`Sign-in failed: ${e.message}`);
    return;
  }
  if (!session) { signOut(); return; }
  await enter(session);
}

async function enter(session) {
  state.token = session.token; state.client = session.client; state.scopes = session.scopes || [];
  $("who").textContent = `Signed in as ${session.client}`;
  $("sign-in").hidden = true; $("station").hidden = false; $("audit").hidden = false;
  await load();
  await stream();
  await loadAudit();
}

async function load() {
  const readers = await (await api("/v1/readers")).json();
  const cards = await (await api("/v1/cards")).json();
  state.readers = new Map(readers.map((r) => [r.name, { card: null, reading: false }]));
  for (const card of cards) {
    state.readers.set(card.reader, { card, reading: false });
    if (card.card_id) {
      const r = await api(`/v1/cards/${card.card_id}/reconciliation`);
      if (r.ok) state.reconciliations.set(card.card_id, await r.json());
    }
  }
  render();
}

async function stream() {
  const { ticket } = await (await api("/v1/events/ticket", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
  })).json();
  const resume = state.last === null ? "" : `&last_event_id=${state.last}`;
  const source = new EventSource(`/v1/events?ticket=${ticket}${resume}`);
  state.source = source;
  const on = (name, handle) => source.addEventListener(name, (e) => {
    state.last = e.lastEventId || state.last;
    handle(e.data ? JSON.parse(e.data) : {});
  });
  source.onopen = () => { $("stream-state").textContent = "Live: changes appear as they happen."; };
  on("reader.added", (d) => { if (!state.readers.has(d.reader)) state.readers.set(d.reader, { card: null, reading: false }); render(); });
  on("reader.removed", (d) => { state.readers.delete(d.reader); render(); });
  on("card.inserted", (d) => { state.readers.set(d.reader, { card: null, reading: true }); render(); });
  on("card.read", (card) => { state.readers.set(card.reader, { card, reading: false }); render(); });
  on("card.read_failed", (card) => { state.readers.set(card.reader, { card, reading: false }); render(); });
  on("card.removed", (d) => { state.readers.set(d.reader, { card: null, reading: false }); render(); });
  on("card.reconciled", (r) => { if (r.card_id) state.reconciliations.set(r.card_id, r); render(); });
  on("revocation.updated", () => { loadAudit(); });
  on("resync", () => { load(); });
  source.onerror = () => {
    $("stream-state").textContent = "Reconnecting…";
    if (source.readyState === EventSource.CLOSED && state.token) setTimeout(() => stream().catch(() => {}), 1000);
  };
}

function holderOf(card) {
  for (const c of card.certificates || []) {
    const cn = /CN=((?:\\,|[^,])+)/.exec(c.subject || "");
    if (cn) return cn[1].replace(/\\,/g, ",").trim();
  }
  return "unknown holder";
}

function verdictBadge(verdict) {
  const [icon, words] = VERDICTS[verdict] || VERDICTS.unknown;
  return el("span", { class: `verdict ${verdict}`, "data-verdict": verdict },
    el("span", { class: "icon", "aria-hidden": "true" }, icon), words);
}

function renderCard(card) {
  const r = card.card_id ? state.reconciliations.get(card.card_id) : null;
  const verdict = card.error ? "unknown" : (r ? r.verdict : "reading");
  const box = el("article", { class: "card", "data-card-id": card.card_id || "" },
    el("h4", {}, isolated(holderOf(card)), ` — ${card.kind.toUpperCase()} card `, card.card_id ? ltr(card.card_id) : "(no card id)"),
    verdictBadge(verdict));
  if (card.error) box.append(el("p", { class: "error" }, "The card could not be read: ", isolated(card.error.message)));
  for (const note of card.notes || []) box.append(el("p", { class: "muted note" }, isolated(note)));
  if (r && r.state !== "matched") box.append(el("p", { class: "muted" }, stateWords(r)));
  const findings = (r && r.findings) || [];
  if (findings.length) {
    const list = el("ul", { class: "findings", "aria-label": "Findings" });
    for (const f of findings) {
      list.append(el("li", { class: f.severity }, el("span", { "aria-hidden": "true" }, `${SEVERITY[f.severity] || ""} `), `${f.severity}: ${f.message}`));
    }
    box.append(list);
  }
  box.append(certificates(card, r));
  if (state.scopes.includes("revoke") && card.card_id && (card.certificates || []).length) {
    const button = el("button", { type: "button", class: "danger" }, "Revoke certificates…");
    button.addEventListener("click", () => openRevoke(card));
    box.append(button);
  }
  return box;
}

function stateWords(r) {
  switch (r.state) {
    case "not_found": return "MIM CM has no record of this card.";
    case "server_unavailable": return r.last_known
      ? `Server unreachable; last known: ${r.last_known.verdict} as of ${r.last_known.checked_at}.`
      : "Server unreachable; no earlier answer is known.";
    case "not_configured": return "No MIM CM server is configured on this station.";
    case "no_card_id": return "This card has no card id, so the servers cannot be asked about it.";
    default: return "";
  }
}

function certificates(card, r) {
  const byThumbprint = new Map(((r && r.certificates) || []).map((c) => [c.thumbprint, c]));
  const table = el("table", {},
    el("caption", { class: "visually-hidden" }, "Certificates on the card"),
    el("thead", {}, el("tr", {}, ...["Slot", "Template", "Expires", "SCEPman"].map((h) => el("th", { scope: "col" }, h)))));
  const body = el("tbody");
  for (const c of card.certificates || []) {
    const seen = byThumbprint.get(c.thumbprint);
    const scepman = seen && seen.scepman ? seen.scepman.status : null;
    body.append(el("tr", {},
      el("td", {}, isolated(c.slot)),
      el("td", {}, c.error ? isolated(`Unreadable: ${c.error}`) : isolated(c.template || (seen && seen.template) || "—")),
      el("td", {}, (c.not_after || "—").slice(0, 10)),
      el("td", { class: scepman ? `status-${scepman}` : "" }, scepman ? SCEPMAN[scepman] || scepman : "—")));
  }
  table.append(body);
  return table;
}

function render() {
  const list = $("readers");
  list.replaceChildren();
  if (!state.readers.size) list.append(el("li", { class: "muted" }, "No reader is connected."));
  for (const [name, slot] of state.readers) {
    const item = el("li", { class: "reader", "data-reader": name }, el("h3", {}, name));
    if (slot.card) item.append(renderCard(slot.card));
    else if (slot.reading) item.append(verdictBadge("reading"));
    else item.append(el("p", { class: "muted" }, "No card."));
    list.append(item);
  }
}

let revoking = null;
function openRevoke(card) {
  revoking = card;
  const n = card.certificates.length;
  $("revoke-what").textContent = `${n} certificate${n === 1 ? "" : "s"} of this card will be revoked in SCEPman. This cannot be undone.`;
  $("revoke-confirm-label").replaceChildren("I confirm: revoke every certificate of card ", ltr(card.card_id), ", held by ", isolated(holderOf(card)), ".");
  $("revoke-confirm").checked = false;
  $("revoke-comment").value = "";
  $("revoke-error").textContent = "";
  $("revoke-dialog").showModal();
  $("revoke-reason").focus();
}

async function submitRevoke(event) {
  event.preventDefault();
  if (!$("revoke-confirm").checked) { $("revoke-error").textContent = "Tick the confirmation first."; return; }
  const body = { card_id: revoking.card_id, target: "certificates", reason: $("revoke-reason").value };
  const comment = $("revoke-comment").value.trim();
  if (comment) body.comment = comment;
  const response = await api("/v1/revocations", {
    method: "POST",
    headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
    body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) { $("revoke-error").textContent = answer.error ? answer.error.message : `HTTP ${response.status}`; return; }
  $("revoke-dialog").close();
  await loadAudit();
}

let auditAsked = 0;
async function loadAudit(event) {
  if (event) event.preventDefault();
  // Several updates may ask at once: only the latest answer is shown, whole.
  const asked = ++auditAsked;
  const terms = [];
  const status = $("audit-status").value;
  const card = $("audit-card").value.trim().replace(/'/g, "''");
  if (status) terms.push(`status eq '${status}'`);
  if (card) terms.push(`card_id eq '${card.toUpperCase()}'`);
  const query = terms.length ? `?$filter=${encodeURIComponent(terms.join(" and "))}` : "";
  const response = await api(`/v1/revocations${query}`);
  const rows = response.ok ? await response.json() : null;
  if (asked !== auditAsked) return;
  if (!rows) {
    $("audit-rows").replaceChildren(el("tr", {}, el("td", { colspan: "7", class: "error" }, "The audit trail is not available.")));
    return;
  }
  $("audit-rows").replaceChildren(...rows.map((r) => el("tr", { "data-revocation": r.id, "data-status": r.status },
    el("td", {}, r.id), el("td", {}, r.created_at), el("td", {}, r.card_id),
    el("td", {}, r.target), el("td", {}, r.reason), el("td", {}, r.client),
    el("td", { class: `status-${r.status}` }, r.status.replace("_", " ")))));
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const session = await openSession({ token: $("token").value });
      $("token").value = "";
      await enter(session);
    } catch (err) {
      $("sign-in-error").textContent = `Sign-in failed: ${err.message}`;
    }
  });
  $("revoke-form").addEventListener("submit", submitRevoke);
  $("revoke-confirm").addEventListener("change", () => { $("revoke-error").textContent = ""; });
  $("revoke-cancel").addEventListener("click", () => $("revoke-dialog").close());
  $("audit-filter").addEventListener("submit", loadAudit);
  start();
});
