// alignkit feedback: keyboard and drag labeling, and the admin forms.
// All text shown here comes from the server already escaped in the page, or is
// set with textContent: never innerHTML with data.
"use strict";

function $(sel, root) { return (root || document).querySelector(sel); }
function $all(sel, root) { return Array.from((root || document).querySelectorAll(sel)); }

function newSubmissionId() {
  // crypto.randomUUID needs a secure context; getRandomValues works everywhere.
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

function setStatus(text, kind) {
  const el = $("#status");
  if (!el) return;
  el.textContent = text;
  el.className = "status" + (kind ? " " + kind : "");
}

async function sendJSON(method, url, body) {
  const resp = await fetch(url, {
    method,
    headers: { "Content-Type": "application/json", "Accept": "application/json" },
    credentials: "same-origin",
    body: JSON.stringify(body),
  });
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : resp.statusText;
    throw new Error(detail);
  }
  return data;
}

// Submit a label, retrying on network errors with the same submission id so
// that a retry can never store the label twice.
// The order is the page's clock, never repeating: a submission held up on the way and
// delivered after a newer one changes nothing on the server.
let lastOrder = 0;
async function submitLabel(body) {
  body.submission_id = newSubmissionId();
  lastOrder = Math.max(Date.now(), lastOrder + 1);
  body.order = lastOrder;
  for (let attempt = 0; ; attempt++) {
    try {
      return await sendJSON("POST", "/api/labels", body);
    } catch (e) {
      if (!(e instanceof TypeError) || attempt >= 4) throw e;  // TypeError = network failure
      setStatus("Connection problem, retrying...", "warn");
      await new Promise((r) => setTimeout(r, 500 * (attempt + 1)));
    }
  }
}

// ---------------------------------------------------------------- guidelines

function setupGuidelines() {
  const dialog = $("#guidelines-dialog");
  const open = $("#open-guidelines");
  if (!dialog || !open) return;
  open.addEventListener("click", () => dialog.showModal());
  $("#close-guidelines").addEventListener("click", () => dialog.close());
  document.addEventListener("keydown", (ev) => {
    if (isTyping(ev) || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if ((ev.key === "g" || ev.key === "G" || ev.key === "?") && !dialog.open) {
      ev.preventDefault();
      dialog.showModal();
    }
  });
}

function isTyping(ev) {
  const t = ev.target;
  return t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable);
}

function guidelinesOpen() {
  const dialog = $("#guidelines-dialog");
  return dialog && dialog.open;
}

// ---------------------------------------------------------------- ranking

function setupRanking() {
  const task = $("#task");
  const k = parseInt(task.dataset.k, 10);
  const itemId = parseInt(task.dataset.itemId, 10);
  // The ranking is a list of tie groups, best first: [[1], [0, 3], [2]].
  let groups = [];
  let history = [];  // snapshots for undo
  let tieNext = false;
  let cantRank = task.dataset.cantRank === "true";
  let busy = false;

  const existing = JSON.parse(task.dataset.ranks || "[]");
  if (existing.length === k) {
    const byRank = new Map();
    existing.forEach((r, i) => { if (!byRank.has(r)) byRank.set(r, []); byRank.get(r).push(i); });
    groups = Array.from(byRank.keys()).sort((a, b) => a - b).map((r) => byRank.get(r));
  }

  function ranked() { return new Set(groups.flat()); }
  function snapshot() { history.push({ groups: groups.map((g) => g.slice()), cantRank }); }

  // Dense ranks, as stored: ties share a rank and the next rank follows ([1, 1, 2]).
  function ranksFromGroups() {
    const ranks = new Array(k).fill(0);
    groups.forEach((g, gi) => { for (const i of g) ranks[i] = gi + 1; });
    return ranks;
  }

  function place(index, tie, beforeGroup) {
    snapshot();
    cantRank = false;
    groups = groups.map((g) => g.filter((i) => i !== index)).filter((g) => g.length);
    if (beforeGroup !== undefined && beforeGroup !== null) {
      const at = Math.min(beforeGroup, groups.length);
      if (tie && groups[at]) groups[at].push(index);
      else groups.splice(at, 0, [index]);
    } else if (tie && groups.length) {
      groups[groups.length - 1].push(index);
    } else {
      groups.push([index]);
    }
    render();
  }

  function render() {
    const list = $("#rank-list");
    list.textContent = "";
    const ranks = ranksFromGroups();
    groups.forEach((g, gi) => {
      const li = document.createElement("li");
      li.className = "rank-row";
      li.dataset.group = String(gi);
      const label = document.createElement("span");
      label.className = "rank-number";
      label.textContent = "#" + ranks[g[0]];
      li.appendChild(label);
      g.forEach((i, n) => {
        if (n > 0) {
          const eq = document.createElement("span");
          eq.className = "tie-sign";
          eq.textContent = "=";
          li.appendChild(eq);
        }
        const chip = document.createElement("span");
        chip.className = "chip";
        chip.draggable = true;
        chip.dataset.index = String(i);
        chip.textContent = "Response " + (i + 1);
        li.appendChild(chip);
      });
      const tieZone = document.createElement("span");
      tieZone.className = "tie-zone";
      tieZone.dataset.group = String(gi);
      tieZone.textContent = "= tie";
      li.appendChild(tieZone);
      list.appendChild(li);
    });
    const inRanking = ranked();
    $all(".completion").forEach((card) => {
      const i = parseInt(card.dataset.index, 10);
      const badge = $(".rank-badge", card);
      card.classList.toggle("is-ranked", inRanking.has(i));
      badge.textContent = inRanking.has(i) ? "rank " + ranks[i] : "";
    });
    task.classList.toggle("is-cant-rank", cantRank);
    if (cantRank) setStatus("Flagged as can't rank. Enter saves; Backspace undoes.", "warn");
    else if (tieNext) setStatus("Tie: press the number to tie with #" + (groups.length ? ranks[groups[groups.length - 1][0]] : 1) + ".");
    else if (inRanking.size === k) setStatus("Ranking complete. Enter saves.");
    else setStatus((k - inRanking.size) + " left to rank.");
  }

  async function save() {
    if (busy) return;
    const left = k - ranked().size;
    if (!cantRank && left === 1) {
      // One left: it can only go last.
      const last = [...Array(k).keys()].find((i) => !ranked().has(i));
      place(last, false);
    } else if (!cantRank && left > 0) {
      setStatus("Rank every response first (" + left + " left), or flag the item with X.", "error");
      return;
    }
    busy = true;
    setStatus("Saving...");
    try {
      const body = cantRank ? { item_id: itemId, cant_rank: true } : { item_id: itemId, ranks: ranksFromGroups() };
      await submitLabel(body);
      setStatus("Saved.", "ok");
      window.location.assign(task.dataset.next);
    } catch (e) {
      busy = false;
      setStatus("Not saved: " + e.message, "error");
    }
  }

  document.addEventListener("keydown", (ev) => {
    if (isTyping(ev) || guidelinesOpen() || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const key = ev.key;
    if (/^[1-9]$/.test(key)) {
      const i = parseInt(key, 10) - 1;
      if (i >= k) return;
      ev.preventDefault();
      if (ranked().has(i) && !tieNext) { setStatus("Response " + key + " is ranked already (Backspace undoes).", "warn"); return; }
      const tie = tieNext && groups.length > 0;
      tieNext = false;
      place(i, tie);
    } else if (key === "=" || key === "+") {
      ev.preventDefault();
      tieNext = groups.length > 0;
      render();
    } else if (key === "Backspace") {
      ev.preventDefault();
      tieNext = false;
      const prev = history.pop();
      if (prev) { groups = prev.groups; cantRank = prev.cantRank; }
      render();
    } else if (key === "Enter") {
      ev.preventDefault();
      save();
    } else if (key === "x" || key === "X") {
      ev.preventDefault();
      snapshot();
      cantRank = !cantRank;
      render();
    }
  });

  $("#save").addEventListener("click", save);
  $("#clear").addEventListener("click", () => { snapshot(); groups = []; cantRank = false; tieNext = false; render(); });
  $("#cant-rank").addEventListener("click", () => { snapshot(); cantRank = !cantRank; render(); });
  $all(".completion").forEach((card) => card.addEventListener("dblclick", () => {
    const i = parseInt(card.dataset.index, 10);
    if (!ranked().has(i)) place(i, false);
  }));

  // Drag and drop: a response (card or chip) dropped on a rank row goes just
  // above that row; on a row's "= tie" zone it ties with it; on the zone below
  // the list it is ranked next.
  document.addEventListener("dragstart", (ev) => {
    const el = ev.target.closest && ev.target.closest("[data-index]");
    if (!el) return;
    ev.dataTransfer.setData("text/plain", el.dataset.index);
    ev.dataTransfer.effectAllowed = "move";
  });
  function dropTarget(ev) {
    return ev.target.closest && ev.target.closest(".tie-zone, .rank-row, #drop-next");
  }
  document.addEventListener("dragover", (ev) => {
    const t = dropTarget(ev);
    if (!t) return;
    ev.preventDefault();
    $all(".drag-over").forEach((e) => e.classList.remove("drag-over"));
    t.classList.add("drag-over");
  });
  document.addEventListener("drop", (ev) => {
    const t = dropTarget(ev);
    $all(".drag-over").forEach((e) => e.classList.remove("drag-over"));
    if (!t) return;
    ev.preventDefault();
    const i = parseInt(ev.dataTransfer.getData("text/plain"), 10);
    if (Number.isNaN(i) || i < 0 || i >= k) return;
    tieNext = false;
    if (t.id === "drop-next") place(i, false);
    else if (t.classList.contains("tie-zone")) place(i, true, parseInt(t.dataset.group, 10));
    else place(i, false, parseInt(t.dataset.group, 10));
  });

  render();
}

// ---------------------------------------------------------------- pairwise

function setupPairwise() {
  const task = $("#task");
  const itemId = parseInt(task.dataset.itemId, 10);
  let choice = task.dataset.choice || null;
  let busy = false;
  const names = { A: "A is better", B: "B is better", tie: "Tie", both_bad: "Both bad" };

  function render() {
    $all(".choice").forEach((b) => b.classList.toggle("selected", b.dataset.choice === choice));
    $all(".response").forEach((r) => r.classList.toggle("selected", r.dataset.choice === choice));
    setStatus(choice ? names[choice] + ". Enter saves." : "Choose A, B, tie or both bad.");
  }

  async function save() {
    if (busy) return;
    if (!choice) { setStatus("Choose first: A, B, T (tie) or X (both bad).", "error"); return; }
    busy = true;
    setStatus("Saving...");
    try {
      await submitLabel({ item_id: itemId, choice });
      window.location.assign(task.dataset.next);
    } catch (e) {
      busy = false;
      setStatus("Not saved: " + e.message, "error");
    }
  }

  const keys = { a: "A", "1": "A", b: "B", "2": "B", t: "tie", x: "both_bad" };
  document.addEventListener("keydown", (ev) => {
    if (isTyping(ev) || guidelinesOpen() || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const k = ev.key.toLowerCase();
    if (keys[k]) { ev.preventDefault(); choice = keys[k]; render(); }
    else if (ev.key === "Enter") { ev.preventDefault(); save(); }
  });
  $all(".choice").forEach((b) => b.addEventListener("click", () => { choice = b.dataset.choice; render(); }));
  $all(".response").forEach((r) => r.addEventListener("click", () => { choice = r.dataset.choice; render(); }));
  $("#save").addEventListener("click", save);
  render();
}

// ---------------------------------------------------------------- admin

function setupAdmin() {
  const form = $("#create-project");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    setStatus("Uploading...");
    const resp = await fetch("/api/projects", { method: "POST", body: new FormData(form), credentials: "same-origin" });
    const data = await resp.json().catch(() => ({}));
    if (resp.ok) window.location.assign("/admin/projects/" + encodeURIComponent(data.name));
    else setStatus("Not created: " + (typeof data.detail === "string" ? data.detail : resp.statusText), "error");
  });
}

function setupAdminProject() {
  const name = $("#project").dataset.project;
  const base = "/api/projects/" + encodeURIComponent(name);
  $("#invite").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const data = await sendJSON("POST", base + "/labelers", { labeler: ev.target.labeler.value });
      const out = $("#invite-link");
      out.hidden = false;
      out.value = data.link;
      out.select();
      setStatus("Send this link to " + data.labeler + " (it is shown only once).", "ok");
    } catch (e) { setStatus("Not invited: " + e.message, "error"); }
  });
  $("#overlap").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await sendJSON("PATCH", base, { overlap: parseInt(ev.target.overlap.value, 10) });
      window.location.reload();
    } catch (e) { setStatus("Not saved: " + e.message, "error"); }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setupGuidelines();
  const page = document.body.dataset.page;
  if (page === "ranking") setupRanking();
  else if (page === "pairwise") setupPairwise();
  else if (page === "admin") setupAdmin();
  else if (page === "admin-project") setupAdminProject();
});
