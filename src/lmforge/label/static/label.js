// lmforge label: keyboard-first judging. Model outputs are untrusted: they only ever go into
// textContent (never as markup), and the server's Content-Security-Policy forbids inline script.
"use strict";

const TOKEN_KEY = "lmforge-label-token";
const $ = (id) => document.getElementById(id);
const S = { token: null, mode: "rank", item: null, ranking: [], verdict: null, flags: {}, pendingFlag: null,
            shownAt: 0, busy: false };

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

async function api(method, path, body) {
  const r = await fetch(path, { method, headers: { "Authorization": "Bearer " + S.token,
    "Content-Type": "application/json" }, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({ detail: "the server sent no JSON (status " + r.status + ")" }));
  if (r.status === 401) { localStorage.removeItem(TOKEN_KEY); showLogin(data.detail); throw new Error(data.detail); }
  if (!r.ok) throw new Error(data.detail || ("HTTP " + r.status));
  return data;
}

function status(text, error) { const s = $("status"); s.textContent = text || ""; s.className = error ? "error" : ""; }
function labelOf(i) { return S.mode === "pairwise" ? "AB"[i] : String(i + 1); }

function showLogin(msg) {
  for (const id of ["work", "done"]) $(id).hidden = true;
  $("login").hidden = false;
  if (msg) $("login").querySelector("p").textContent = msg;
  $("token").focus();
}

function setProgress(p) {
  $("bar").style.width = (p.total ? 100 * p.done / p.total : 100) + "%";
  $("count").textContent = p.done + " / " + p.total;
}

function shortcuts() {
  const k = S.item ? S.item.responses.length : 4;
  const rows = S.mode === "pairwise"
    ? [["a / 1", "A is better"], ["b / 2", "B is better"], ["t", "tie"], ["x", "both bad"]]
    : [["1-" + k, "rank the next best"], ["t", "all equal (tie)"], ["x", "all bad"], ["Backspace", "clear ranking"]];
  rows.push(["u then N", "flag N unsafe"], ["w then N", "flag N factually wrong"], ["e", "ideal answer"],
            ["n", "note"], ["Esc", "leave a text field"], ["Enter", "submit (Ctrl+Enter in the answer)"],
            ["s", "skip"], ["z", "undo last judgment"]);
  const f = $("keys");
  f.replaceChildren();
  for (const [key, what] of rows) { const s = el("span"); s.append(el("span", "key", key), " " + what); f.append(s); }
}

function render() {
  const it = S.item;
  const prompt = $("prompt");
  prompt.replaceChildren();
  for (const t of it.prompt) {
    const d = el("div", "turn");
    d.append(el("span", "role", t.role + ":"), document.createTextNode(t.content));
    prompt.append(d);
  }
  const bar = $("ranking");
  bar.replaceChildren();
  if (S.mode === "rank") {
    bar.append(el("span", "", "Ranking:"));
    it.responses.forEach((_, pos) => {
      const rid = S.ranking[pos];
      const slot = el("div", "slot" + (rid !== undefined ? " filled" : ""),
                      "#" + (pos + 1) + " = " + (rid !== undefined ? labelOf(indexOf(rid)) : "…"));
      slot.addEventListener("dragover", (e) => e.preventDefault());
      slot.addEventListener("drop", (e) => { e.preventDefault(); placeAt(Number(e.dataTransfer.getData("text/plain")), pos); });
      bar.append(slot);
    });
  } else {
    const v = S.verdict === "tie" ? "tie" : S.verdict === "all_bad" ? "both bad"
      : S.ranking.length ? labelOf(indexOf(S.ranking[0])) + " is better" : "…";
    bar.append(el("span", "", "Choice: "), el("strong", "", v));
  }
  const box = $("responses");
  box.replaceChildren();
  it.responses.forEach((r, i) => {
    const rank = S.ranking.indexOf(r.id);
    let cls = "card";
    if (rank >= 0) cls += S.mode === "pairwise" ? (rank === 0 ? " chosen" : "") : (rank === 0 ? " best" : " ranked");
    const card = el("div", cls);
    card.draggable = true;
    card.dataset.rid = r.id;
    card.addEventListener("dragstart", (e) => e.dataTransfer.setData("text/plain", String(r.id)));
    card.addEventListener("click", () => choose(i));
    const head = el("div", "head");
    head.append(el("span", "label", labelOf(i)));
    if (rank >= 0 && S.mode === "rank") head.append(el("span", "rank", "#" + (rank + 1)));
    for (const f of S.flags[r.id] || []) head.append(el("span", "flag " + f, f));
    card.append(head, el("pre", "text", r.text));
    box.append(card);
  });
  shortcuts();
}

function indexOf(rid) { return S.item.responses.findIndex((r) => r.id === rid); }

function placeAt(rid, pos) {
  if (indexOf(rid) < 0) return;
  S.ranking = S.ranking.filter((x) => x !== rid);
  S.ranking.splice(Math.min(pos, S.ranking.length), 0, rid);
  S.verdict = null;
  completeRanking();
  render();
}

function completeRanking() {
  const ids = S.item.responses.map((r) => r.id);
  if (S.ranking.length === ids.length - 1) S.ranking.push(ids.find((x) => !S.ranking.includes(x)));
  if (S.ranking.length === ids.length) S.verdict = "ranked";
}

function choose(i) {
  const r = S.item.responses[i];
  if (!r) return;
  if (S.pendingFlag) {
    const f = new Set(S.flags[r.id] || []);
    f.has(S.pendingFlag) ? f.delete(S.pendingFlag) : f.add(S.pendingFlag);
    S.flags[r.id] = [...f];
    status(S.pendingFlag + " flag " + (f.has(S.pendingFlag) ? "set on " : "removed from ") + labelOf(i));
    S.pendingFlag = null;
  } else if (S.mode === "pairwise") {
    S.ranking = [r.id, S.item.responses[1 - i].id];
    S.verdict = "ranked";
    status("");
  } else if (!S.ranking.includes(r.id)) {
    S.ranking.push(r.id);
    completeRanking();
    status(S.verdict ? "ranking complete: Enter submits" : "");
  }
  render();
}

function clearChoice() { S.ranking = []; S.verdict = null; render(); }

function setVerdict(v) { S.ranking = []; S.verdict = v; status(v === "tie" ? "tie: Enter submits" : "all bad: Enter submits"); render(); }

async function submit(verdict) {
  if (S.busy || !S.item) return;
  verdict = verdict || S.verdict;
  if (!verdict) { status(S.mode === "pairwise" ? "choose A, B, t or x first" : "rank every response first (or t / x)", true); return; }
  const body = { item_id: S.item.id, verdict, ranking: verdict === "ranked" ? S.ranking : null, flags: S.flags,
                 ideal: $("ideal").value.trim() || null, note: $("note").value.trim() || null,
                 seconds: Math.round((performance.now() - S.shownAt) / 10) / 100 };
  S.busy = true;
  try {
    await api("POST", "/api/judgments", body);
    status(verdict === "skip" ? "skipped" : "saved");
    await loadNext();
  } catch (e) { status(e.message, true); }
  finally { S.busy = false; }
}

async function undo() {
  if (S.busy) return;
  S.busy = true;
  try {
    const r = await api("POST", "/api/undo");
    await loadNext();
    status(r.item_id === null ? "nothing to undo" : "undone: the judgment is back for editing");
  } catch (e) { status(e.message, true); }
  finally { S.busy = false; }
}

function prefill(prev) {
  S.ranking = []; S.verdict = null; S.flags = {}; S.pendingFlag = null;
  $("ideal").value = ""; $("note").value = "";
  if (!prev) return;
  if (prev.verdict !== "skip") S.verdict = prev.verdict;
  S.ranking = prev.ranking || [];
  for (const [rid, fs] of Object.entries(prev.flags || {})) S.flags[Number(rid)] = fs;
  $("ideal").value = prev.ideal || ""; $("note").value = prev.note || "";
}

async function loadNext() {
  const r = await api("GET", "/api/next");
  setProgress(r.progress);
  S.item = r.item;
  $("login").hidden = true;
  if (!r.item) { $("work").hidden = true; $("done").hidden = false; shortcuts(); return; }
  $("done").hidden = true; $("work").hidden = false;
  prefill(r.previous);
  S.shownAt = performance.now();
  render();
  document.activeElement && document.activeElement.blur();
}

function onKey(e) {
  const typing = e.target && (e.target.tagName === "TEXTAREA" || e.target.tagName === "INPUT");
  if (typing) {
    if (e.key === "Escape") { e.target.blur(); e.preventDefault(); }
    else if (e.key === "Enter" && (e.target.tagName === "INPUT" && e.target.id !== "token" || e.ctrlKey)) {
      e.preventDefault(); e.target.blur(); submit();
    }
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const k = e.key.toLowerCase();
  let handled = true;
  if (k === "z") undo();
  else if (!S.item) handled = false;
  else if (/^[1-9]$/.test(k)) choose(Number(k) - 1);
  else if (S.mode === "pairwise" && (k === "a" || k === "b")) choose(k === "a" ? 0 : 1);
  else if (k === "t") setVerdict("tie");
  else if (k === "x") setVerdict("all_bad");
  else if (k === "backspace") clearChoice();
  else if (k === "u" || k === "w") { S.pendingFlag = k === "u" ? "unsafe" : "wrong"; status("flag " + S.pendingFlag + ": press the response's key"); }
  else if (k === "escape") { S.pendingFlag = null; status(""); }
  else if (k === "e") {
    const ideal = $("ideal");
    if (!ideal.value && S.ranking.length) ideal.value = S.item.responses[indexOf(S.ranking[0])].text;
    ideal.focus();
  } else if (k === "n") $("note").focus();
  else if (k === "s") submit("skip");
  else if (k === "enter") submit();
  else handled = false;
  if (handled) e.preventDefault();
}

async function start() {
  const params = new URLSearchParams(location.search);
  if (params.get("token")) {
    localStorage.setItem(TOKEN_KEY, params.get("token"));
    history.replaceState(null, "", location.pathname);  // keep the token out of the address bar
  }
  S.token = localStorage.getItem(TOKEN_KEY);
  if (!S.token) { showLogin(); return; }
  try {
    const me = await api("GET", "/api/me");
    S.mode = me.mode;
    $("who").textContent = me.name + " · " + (me.mode === "pairwise" ? "pairwise" : "ranking");
    await loadNext();
  } catch (e) { status(e.message, true); }
}

document.addEventListener("keydown", onKey);
document.addEventListener("DOMContentLoaded", () => {
  $("go").addEventListener("click", () => { localStorage.setItem(TOKEN_KEY, $("token").value.trim()); start(); });
  $("submit").addEventListener("click", () => submit());
  $("skip").addEventListener("click", () => submit("skip"));
  $("undo").addEventListener("click", () => undo());
  start();
});
