// The feedback pages: label, chat, eval (a blind study) and admin. No framework, no build step.
"use strict";
const $ = (selector) => document.querySelector(selector);
const KEY = "rlhf-ray-annotator-key";
const page = document.body.dataset.page;

function say(text, kind = "info") {
  const box = $("#message");
  box.textContent = text;
  box.className = kind;
}

// A conversation as people read it: the chat template's marks (ChatML's, the task tokenizer's) become one
// "[role]" line per turn. A dialogue's answer is a whole conversation; a served chat's prompt is one too.
function readable(text) {
  return text
    .replace(/<\|im_start\|>(\w+)\n/g, "\n[$1] ")
    .replace(/\s*<\|(system|user|assistant|tool)\|>\s*/g, "\n[$1] ")
    .replace(/\s*(<\|im_end\|>|<\|end\|>)\s*/g, "\n")
    .replace(/\n{2,}/g, "\n")
    .trim();
}

async function call(method, path, body, headers = {}) {
  const response = await fetch(path, {
    method,
    headers: { "Content-Type": "application/json", "X-Annotator-Key": localStorage.getItem(KEY) || "", ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch (err) { /* not JSON */ }
  if (!response.ok) {
    const error = new Error((data && data.error && data.error.message) || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

// --- signing in with an annotator key -------------------------------------------------------------
async function signIn(typed = false) {
  try {
    const me = await call("GET", "/ui/api/me");
    $("#who").textContent = `${me.annotator} · ${me.model}`;
    $("#key-form").classList.add("hidden");
    $("#work").classList.remove("hidden");
    return me;
  } catch (err) {
    $("#key-form").classList.remove("hidden");
    $("#work").classList.add("hidden");
    if (typed || localStorage.getItem(KEY)) say(err.message, "error");  // not on a first visit
    return null;
  }
}

function setUpKeyForm(start) {
  $("#key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    localStorage.setItem(KEY, $("#key").value.trim());
    const me = await signIn(true);
    if (me) { document.activeElement.blur(); say(""); start(me); }
  });
  $("#sign-out").addEventListener("click", () => { localStorage.removeItem(KEY); location.reload(); });
}

// --- label and eval: one item at a time from a queue ----------------------------------------------
const queueState = { queue: null, item: null, busy: false };

async function loadNext() {
  const next = await call("GET", `/ui/api/next?queue=${encodeURIComponent(queueState.queue)}`);
  const q = next.queue;
  const what = page === "eval" ? "Blind study" : `Queue (${q.source})`;
  $("#queue-header").textContent = `${what} “${q.name}”: ${q.description}. You have labelled ${next.labelled}; ` +
    `${q.done} of ${q.items} items complete.`;
  queueState.item = next.item;
  $("#item").classList.toggle("hidden", !next.item);
  $("#done").classList.toggle("hidden", !!next.item);
  if (!next.item) return;
  $("#item").dataset.itemId = next.item.id;
  $("#prompt").textContent = readable(next.item.prompt);
  $("#answer-a").textContent = readable(next.item.response_a);
  $("#answer-b").textContent = readable(next.item.response_b);
  for (const id of ["#comment", "#rating-a", "#rating-b"]) if ($(id)) $(id).value = "";
}

function ratingOf(id) {
  const field = $(id);
  return field && field.value ? Number(field.value) : null;
}

async function submitLabel(choice) {
  if (queueState.busy || !queueState.item) return;  // a second click while the first is on its way
  queueState.busy = true;
  document.querySelectorAll("#item button").forEach((b) => { b.disabled = true; });
  const body = { queue: queueState.queue, item_id: queueState.item.id, choice,
                 rating_a: ratingOf("#rating-a"), rating_b: ratingOf("#rating-b"),
                 comment: $("#comment").value.trim() || null };
  try {
    const ack = await call("POST", "/ui/api/labels", body);
    say(`Saved label ${ack.id} of item ${ack.item_id}.`, "ok");
    await loadNext();
  } catch (err) {
    say(err.message, "error");
    if (err.status === 409) await loadNext();
  } finally {
    queueState.busy = false;
    document.querySelectorAll("#item button").forEach((b) => { b.disabled = false; });
  }
}

function startQueue(me) {
  const studies = page === "eval";
  const queues = me.queues.filter((q) => (q.source === "study") === studies);
  const select = $("#queue-select");
  select.innerHTML = "";
  for (const q of queues) select.add(new Option(`${q.name} (${q.source}, ${q.items} items)`, q.name));
  const wanted = new URLSearchParams(location.search).get("queue");
  if (wanted && queues.some((q) => q.name === wanted)) select.value = wanted;
  else if (wanted && queues.length) say(`There is no ${studies ? "study" : "queue"} “${wanted}”; showing “${select.value}”.`, "error");
  if (!queues.length) { say(studies ? "No study yet: create one with `rlhf-ray study create`." :
                            "No queue yet: add pairs with `rlhf-ray queue add`, or serve with n >= 2.", "error"); return; }
  queueState.queue = select.value;
  select.onchange = () => { queueState.queue = select.value; loadNext().catch((e) => say(e.message, "error")); };
  loadNext().catch((err) => say(err.message, "error"));
}

function setUpQueuePage() {
  $("#choose-A").addEventListener("click", () => submitLabel("A"));
  $("#choose-B").addEventListener("click", () => submitLabel("B"));
  $("#choose-tie").addEventListener("click", () => submitLabel("tie"));
  if ($("#rate-only")) $("#rate-only").addEventListener("click", () => submitLabel(null));
  document.addEventListener("keydown", (event) => {
    if (["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName) || event.ctrlKey || event.metaKey) return;
    const key = event.key.toLowerCase();
    const actions = { a: "A", b: "B", t: "tie" };
    if (key in actions) { event.preventDefault(); submitLabel(actions[key]); }
    if (key === "r" && $("#rate-only")) { event.preventDefault(); submitLabel(null); }
  });
}

// --- chat: talk to the served policy, rate its answers --------------------------------------------
const conversation = [];

function addTurn(role, text, completionId) {
  const turn = document.createElement("div");
  turn.className = `turn ${role}`;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  bubble.textContent = text;
  turn.appendChild(bubble);
  if (completionId) {
    const rate = document.createElement("div");
    rate.className = "rate";
    rate.dataset.completionId = completionId;
    rate.innerHTML = '<button class="like-up" title="a good answer">Like</button> <button class="like-down" title="a bad answer">Dislike</button> ' +
      '<select class="rating"><option value="">rate 1–5</option><option>1</option><option>2</option><option>3</option>' +
      '<option>4</option><option>5</option></select> <span class="status muted"></span>';
    rate.querySelector(".like-up").onclick = () => sendFeedback(rate, { like: true });
    rate.querySelector(".like-down").onclick = () => sendFeedback(rate, { like: false });
    rate.querySelector(".rating").onchange = (event) => sendFeedback(rate, { rating: Number(event.target.value) });
    turn.appendChild(rate);
  }
  $("#chat-log").appendChild(turn);
}

async function sendFeedback(rate, value) {
  try {
    const ack = await call("POST", "/ui/api/feedback", { completion_id: rate.dataset.completionId, ...value });
    rate.querySelector(".status").textContent = `saved (${ack.kind} ${ack.id})`;
    say("Thank you: feedback saved.", "ok");
  } catch (err) { say(err.message, "error"); }
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("#chat-input").value.trim();
  if (!text) return;
  $("#send").disabled = true;
  conversation.push({ role: "user", content: text });
  addTurn("user", text);
  $("#chat-input").value = "";
  try {
    const answer = await call("POST", "/ui/api/chat", { messages: conversation });
    const content = answer.choices[0].message.content;
    conversation.push({ role: "assistant", content });
    addTurn("assistant", content, answer.id);
    say("");
  } catch (err) {
    conversation.pop();
    say(err.message, "error");
  } finally { $("#send").disabled = false; }
}

// --- admin: queues, progress, study results (the API key) -----------------------------------------
const esc = (v) => String(v ?? "–").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));

function table(header, rows) {
  const head = `<tr>${header.map((h) => `<th>${esc(h)}</th>`).join("")}</tr>`;
  const cell = (v) => `<td>${esc(v)}</td>`;
  return `<table>${head}${rows.map((r) => `<tr>${r.map(cell).join("")}</tr>`).join("")}</table>`;
}

const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);

async function loadAdmin(event) {
  if (event) event.preventDefault();
  const key = $("#api-key").value.trim();
  try {
    const data = await call("GET", "/ui/api/admin", undefined, key ? { Authorization: `Bearer ${key}` } : {});
    $("#queues").innerHTML = table(["queue", "source", "items", "labels", "complete", "labels per item"],
      data.queues.map((q) => [q.name, q.source, q.items, q.labels, `${q.done} / ${q.items}`, q.labels_per_item]));
    $("#annotators").innerHTML = table(["annotator", "labels"], data.annotators.map((a) => [a.name, a.labels]));
    $("#studies").innerHTML = Object.values(data.studies).map((s) => {
      const w = s.win_rate;
      const models = `${s.models.a || "a"} vs ${s.models.b || "b"}`;
      const summary = w ? `win rate of ${s.models.a || "a"}: ${pct(w.rate)} (95% CI ${pct(w.low)}–${pct(w.high)}); ` +
        `${w.wins} wins, ${w.losses} losses, ${w.ties} ties` : "no labels yet";
      const kappa = s.agreement.map((g) => [g.annotators.join(" & "), g.items, g.agreed,
        g.kappa === null ? "undefined" : g.kappa.toFixed(3)]);
      const counts = Object.entries(s.per_annotator).map(([n, c]) => [n, c.win, c.loss, c.tie]);
      return `<h3>${esc(s.study)}: ${esc(models)}</h3><p class="study-summary">${esc(summary)}</p>` +
        (counts.length ? table(["annotator", "wins", "losses", "ties"], counts) : "") +
        (kappa.length ? table(["annotators", "shared items", "agreed", "Cohen's kappa"], kappa) : "");
    }).join("") || "<p class='muted'>No study yet.</p>";
    say(`Loaded at ${new Date().toLocaleTimeString()}.`, "ok");
  } catch (err) { say(err.message, "error"); }
}

// --- start --------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", async () => {
  if (page === "admin") { $("#admin-form").addEventListener("submit", loadAdmin); return; }
  const start = page === "chat" ? () => {} : startQueue;
  setUpKeyForm(start);
  if (page === "chat") $("#chat-form").addEventListener("submit", sendChat);
  else setUpQueuePage();
  const me = await signIn();
  if (me) start(me);
});
