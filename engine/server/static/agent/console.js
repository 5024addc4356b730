// Helpline agent console. Vanilla JS, no build step.
//
// Data flow: the JSON API under /agent/api answers requests (queue, one
// conversation, actions); the WebSocket /agent/ws pushes what changes
// (queue, handoffs, new customer messages, ownership). After a reconnect the
// page re-reads what it shows, so nothing is lost while offline.
// All text from the server is inserted with textContent, never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_EVENTS = new Set(["handoff", "claim", "hand_back", "resolve", "timeout", "rating",
    "journey_restarted", "policy_violation", "action_failed"]);
  const REASONS = {
    satisfaction: "Unhappy customer", request: "Asked for a human", policy: "Policy",
    failures: "Bot stuck", error: "Error", timeout: "Timeout",
  };
  const SOURCES = { customer: "customer said", model: "model inferred", action: "lookup",
    agent: "agent", engine: "engine" };

  const state = {
    agent: null, csrf: null,
    queue: [], queueAt: 0,          // items and when they arrived (for the timers)
    filter: "all",
    selected: null, detail: null, detailAt: 0,
    records: new Map(),             // seq -> record of the open conversation
    unread: new Map(),              // conversation id -> count
    lastText: new Map(),            // conversation id -> last customer text
    fresh: new Set(),
    mode: "reply", showEvents: false,
    drafts: new Map(),              // conversation id -> unsent text
    told: new Map(),                // conversation id -> when a live update toasted it
    ws: null, wsRetry: 0, wsTimer: null, loadSeq: 0,
  };

  // -- helpers --------------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function icon(paths) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("class", "empty-icon");
    svg.setAttribute("aria-hidden", "true");
    for (const d of paths) {
      const path = document.createElementNS(ns, "path");
      path.setAttribute("d", d);
      svg.append(path);
    }
    return svg;
  }

  function duration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 3600) return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
    const m = Math.floor(s / 60);
    return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
  }

  function clock(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function capital(name) {
    return name ? name.charAt(0).toUpperCase() + name.slice(1) : "";
  }

  function agentOf(author) {
    return author && author.startsWith("agent:") ? author.slice(6) : null;
  }

  function reasonBadge(reason) {
    const r = reason || "request";
    return h("span", { class: `badge badge-${r}`, "data-reason": r, title: r },
      REASONS[r] || r);
  }

  function valueText(v) {
    if (v === null || v === undefined) return "—";
    return typeof v === "object" ? JSON.stringify(v) : String(v);
  }

  function toast(message, kind) {
    const el = h("div", { class: `toast${kind === "error" ? " toast-error" : ""}`,
      role: "status", "data-testid": "toast" }, message);
    $("toasts").append(el);
    setTimeout(() => el.remove(), kind === "error" ? 6000 : 3500);
  }

  // -- API ------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.message) || `HTTP ${status}`);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (method !== "GET") {
      headers["Content-Type"] = "application/json";
      if (state.csrf) headers["X-CSRF-Token"] = state.csrf;
    }
    const res = await fetch(`/agent/api/${path}`, {
      method, headers, credentials: "same-origin",
      body: method === "GET" ? undefined : JSON.stringify(body || {}),
    });
    let data = null;
    try { data = await res.json(); } catch { data = null; }
    if (res.status === 401 && state.agent && path !== "login") {
      showLogin("Your session ended. Please log in again.");
    }
    if (!res.ok) throw new ApiError(res.status, data);
    return data;
  }

  // -- login ----------------------------------------------------------------------------

  function showLogin(message) {
    stopSocket();
    state.agent = null;
    state.csrf = null;
    $("app").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("login-password").value = "";
    ($("login-name").value ? $("login-password") : $("login-name")).focus();
  }

  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const name = $("login-name").value.trim();
    const password = $("login-password").value;
    if (!name || !password) {
      $("login-error").textContent = "Enter your name and password.";
      return;
    }
    const button = ev.submitter || $("login-form").querySelector("button");
    button.disabled = true;
    try {
      const me = await api("POST", "login", { name, password });
      start(me);
    } catch (err) {
      $("login-error").textContent = err.message;
      $("login-password").select();
    } finally {
      button.disabled = false;
    }
  });

  $("logout").addEventListener("click", async () => {
    try { await api("POST", "logout"); } catch { /* the cookie may be gone already */ }
    state.selected = null;
    state.detail = null;
    showLogin("You are logged out.");
  });

  function start(me) {
    state.agent = me.agent;
    state.csrf = me.csrf;
    $("login").hidden = true;
    $("app").hidden = false;
    $("me-name").textContent = capital(me.agent);
    $("me-avatar").textContent = me.agent.charAt(0);
    renderQueue();
    renderConversation();
    connect();
  }

  // -- live updates ---------------------------------------------------------------------

  function setConn(kind, text) {
    $("conn").className = `conn conn-${kind}`;
    $("conn-text").textContent = text;
  }

  function connect() {
    stopSocket();
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/agent/ws`;
    const ws = new WebSocket(url);
    state.ws = ws;
    setConn("connecting", state.wsRetry ? "Reconnecting…" : "Connecting…");
    ws.onopen = () => {
      state.wsRetry = 0;
      setConn("live", "Live");
      watch();
      if (state.selected) loadConversation(state.selected, { quiet: true });
    };
    ws.onmessage = (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch { return; }
      onMessage(msg);
    };
    ws.onclose = (ev) => {
      if (state.ws !== ws) return;
      state.ws = null;
      if (ev.code === 4401) { showLogin("Your session ended. Please log in again."); return; }
      if (!state.agent) return;
      const delay = Math.min(15000, 500 * 2 ** state.wsRetry) + Math.random() * 400;
      state.wsRetry += 1;
      setConn(state.wsRetry > 2 ? "offline" : "connecting",
        state.wsRetry > 2 ? "Offline, retrying…" : "Reconnecting…");
      state.wsTimer = setTimeout(connect, delay);
    };
  }

  function stopSocket() {
    clearTimeout(state.wsTimer);
    const ws = state.ws;
    state.ws = null;
    if (ws) { ws.onclose = null; ws.close(); }
  }

  function watch() {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) {
      state.ws.send(JSON.stringify({ type: "watch", conversation_id: state.selected }));
    }
  }

  function onMessage(msg) {
    switch (msg.type) {
      case "hello":
      case "queue":
        setQueue(msg.type === "hello" ? msg.queue : msg.items);
        break;
      case "handoff":
        state.fresh.add(msg.conversation_id);
        setTimeout(() => state.fresh.delete(msg.conversation_id), 2500);
        break;
      case "activity":
        if (msg.text) state.lastText.set(msg.conversation_id, msg.text);
        if (msg.conversation_id !== state.selected || document.hidden) {
          state.unread.set(msg.conversation_id, (state.unread.get(msg.conversation_id) || 0) + 1);
        }
        renderQueue();
        break;
      case "conversation":
        onConversation(msg);
        break;
      case "records":
        if (msg.conversation_id === state.selected && state.detail) {
          mergeRecords(msg.records);
        }
        break;
      default:
        break;
    }
  }

  function onConversation(msg) {
    const conv = msg.conversation;
    if (conv.id !== state.selected || !state.detail) return;
    const before = state.detail.conversation;
    state.detail.conversation = conv;
    state.detailAt = Date.now();
    if (msg.agent && msg.agent !== state.agent && before.owner !== conv.owner) {
      const who = capital(msg.agent);
      const what = { claim: "claimed", hand_back: "handed back", resolve: "resolved" }[msg.action];
      if (what) {
        toast(`${who} ${what} this conversation.`);
        state.told.set(conv.id, Date.now());
      }
    } else if (msg.action === "timeout") {
      toast("Nobody claimed it in time: the bot took over and offered a callback.");
      state.told.set(conv.id, Date.now());
    }
    renderConversation();
  }

  // -- queue ----------------------------------------------------------------------------

  function setQueue(items) {
    state.queue = items || [];
    state.queueAt = Date.now();
    const ids = new Set(state.queue.map((i) => i.conversation_id));
    for (const id of [...state.unread.keys()]) if (!ids.has(id)) state.unread.delete(id);
    renderQueue();
  }

  function visibleQueue() {
    const mine = (i) => i.owner === "human" && i.owner_agent === state.agent;
    if (state.filter === "waiting") return state.queue.filter((i) => i.owner === "pending_human");
    if (state.filter === "mine") return state.queue.filter(mine);
    return state.queue;
  }

  function renderQueue() {
    const box = $("queue");
    const waiting = state.queue.filter((i) => i.owner === "pending_human");
    const mine = state.queue.filter((i) => i.owner === "human" && i.owner_agent === state.agent);
    $("count-waiting").textContent = waiting.length;
    $("count-mine").textContent = mine.length;
    document.title = `${waiting.length ? `(${waiting.length}) ` : ""}Helpline · Agent console`;

    const items = visibleQueue();
    box.replaceChildren();
    if (!items.length) {
      const text = state.filter === "mine" ? "You have no conversations right now."
        : "All quiet. New handoffs appear here the moment they happen.";
      box.append(h("div", { class: "empty-state", "data-testid": "queue-empty" },
        icon(["M18 8h1a4 4 0 0 1 0 8h-1", "M2 8h16v9a4 4 0 0 1-4 4H6a4 4 0 0 1-4-4V8z",
          "M6 1v3", "M10 1v3", "M14 1v3"]),
        h("h3", {}, "Nothing waiting"), h("p", {}, text)));
      return;
    }
    const groups = [
      ["Waiting", items.filter((i) => i.owner === "pending_human")],
      ["Yours", items.filter((i) => i.owner === "human" && i.owner_agent === state.agent)],
      ["With colleagues", items.filter((i) => i.owner === "human" && i.owner_agent !== state.agent)],
    ];
    for (const [title, group] of groups) {
      if (!group.length) continue;
      box.append(h("div", { class: "qsection" }, `${title} · ${group.length}`));
      for (const item of group) box.append(queueItem(item));
    }
    tickTimers();
  }

  function queueItem(item) {
    const id = item.conversation_id;
    const unread = state.unread.get(id) || 0;
    const claimedBy = item.owner === "human"
      ? (item.owner_agent === state.agent ? "with you" : `with ${capital(item.owner_agent)}`)
      : null;
    const last = state.lastText.get(id);
    const classes = ["qitem"];
    if (id === state.selected) classes.push("selected");
    if (state.fresh.has(id)) classes.push("fresh");
    if (item.owner === "human") classes.push("claimed");
    return h("button", {
      type: "button", class: classes.join(" "), "data-testid": "queue-item",
      "data-conversation-id": id, "data-reason": item.reason, "data-owner": item.owner,
      onclick: () => select(id),
    },
    h("div", { class: "qrow" },
      reasonBadge(item.reason),
      item.priority === "high" ? h("span", { class: "prio" }, "High") : null,
      h("span", { class: "timer", "data-since": String(item.waiting_seconds),
        title: "Waiting time" })),
    h("div", { class: "qpreview", lang: langTag(item.language) }, last || item.preview || "—"),
    h("div", { class: "qmeta" },
      [item.channel, (item.language || "").toUpperCase(), item.flow || "no flow", claimedBy]
        .filter(Boolean).join(" · ")),
    unread ? h("span", { class: "unread", "data-testid": "unread",
      title: `${unread} new message${unread > 1 ? "s" : ""}` }, String(unread)) : null);
  }

  function langTag(language) {
    return language === "zh" ? "zh-CN" : (language || "en");
  }

  function tickTimers() {
    const elapsed = (Date.now() - state.queueAt) / 1000;
    for (const el of document.querySelectorAll("#queue .timer[data-since]")) {
      const s = Number(el.dataset.since) + elapsed;
      el.textContent = duration(s);
      el.classList.toggle("warn", s >= 120 && s < 300);
      el.classList.toggle("late", s >= 300);
    }
    const side = $("side-timer");
    const conv = state.detail && state.detail.conversation;
    if (conv && conv.waiting_seconds !== null && ["pending_human", "human"].includes(conv.owner)) {
      const s = conv.waiting_seconds + (Date.now() - state.detailAt) / 1000;
      side.textContent = `${conv.owner === "human" ? "open" : "waiting"} ${duration(s)}`;
      side.classList.toggle("late", conv.owner === "pending_human" && s >= 300);
    } else {
      side.textContent = "";
    }
  }
  setInterval(tickTimers, 1000);

  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      state.filter = tab.dataset.filter;
      for (const t of document.querySelectorAll(".tab")) {
        t.setAttribute("aria-selected", String(t === tab));
      }
      renderQueue();
    });
  }

  // -- one conversation -----------------------------------------------------------------

  function select(id) {
    if (id === state.selected) return;
    const input = $("composer-input");
    if (state.selected) state.drafts.set(state.selected, input.value);
    input.value = state.drafts.get(id) || "";
    state.drafts.delete(id);
    state.selected = id;
    state.detail = null;
    state.records = new Map();
    state.unread.delete(id);
    closeConfirms();
    setMode("reply");
    watch();
    renderQueue();
    renderConversation();
    loadConversation(id);
  }

  async function loadConversation(id, opts) {
    const seq = ++state.loadSeq;
    try {
      const detail = await api("GET", `conversations/${encodeURIComponent(id)}`);
      if (seq !== state.loadSeq || id !== state.selected) return;
      state.detail = detail;
      state.detailAt = Date.now();
      state.records = new Map(detail.transcript.map((r) => [r.seq, r]));
      renderConversation({ scroll: !(opts && opts.quiet) });
    } catch (err) {
      if (err.status === 404) {
        toast("That conversation no longer exists.", "error");
        state.selected = null;
        renderConversation();
      } else if (err.status !== 401 && !(opts && opts.quiet)) {
        toast(`Could not load the conversation: ${err.message}`, "error");
      }
    }
  }

  function mergeRecords(records) {
    const box = $("transcript");
    const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    for (const r of records) state.records.set(r.seq, r);
    renderTranscript();
    if (nearBottom) box.scrollTop = box.scrollHeight;
    else $("new-below").hidden = false;
  }

  function mineNow() {
    const c = state.detail && state.detail.conversation;
    return Boolean(c && c.owner === "human" && c.owner_agent === state.agent);
  }

  function renderConversation(opts) {
    const open = Boolean(state.selected);
    $("chat-empty").hidden = open;
    $("chat").hidden = !open;
    $("side-empty").hidden = open && Boolean(state.detail);
    $("side").hidden = !(open && state.detail);
    if (!open) return;
    if (!state.detail) {
      $("chat-title").textContent = "Loading…";
      $("chat-sub").textContent = "";
      $("transcript").replaceChildren();
      return;
    }
    const d = state.detail;
    const c = d.conversation;
    $("chat-title").textContent = `${capital(c.channel)} conversation · ${c.thread}`;
    $("chat-sub").textContent = [c.flow ? `flow ${c.flow}` : "no flow",
      c.state ? `state ${c.state}` : null, (c.language || "").toUpperCase()]
      .filter(Boolean).join(" · ");
    renderTranscript();
    if (opts && opts.scroll) {
      const box = $("transcript");
      box.scrollTop = box.scrollHeight;
    }
    renderSide();
    renderComposer();
    tickTimers();
  }

  // -- transcript -----------------------------------------------------------------------

  function renderTranscript() {
    const box = $("transcript");
    const lang = langTag(state.detail && state.detail.conversation.language);
    const nodes = [];
    if (state.detail && state.detail.truncated) {
      nodes.push(h("div", { class: "event system" }, "earlier messages not shown"));
    }
    const records = [...state.records.values()].sort((a, b) => a.seq - b.seq);
    for (const r of records) {
      const node = recordNode(r, lang);
      if (node) nodes.push(node);
    }
    if (!nodes.length) nodes.push(h("div", { class: "event" }, "No messages yet"));
    box.replaceChildren(...nodes);
  }

  function recordNode(r, lang) {
    const time = clock(r.at);
    if (r.kind === "note") {
      return h("div", { class: "note", "data-testid": "note", "data-seq": r.seq, title: r.at },
        h("div", { class: "who" }, `Internal note · ${capital(agentOf(r.author))} · ${time}`),
        h("div", { lang }, r.text));
    }
    if (r.direction === "event") {
      const key = KEY_EVENTS.has(r.text);
      if (!key && !state.showEvents) return null;
      return h("div", { class: `event ${key ? "key" : "system"}`, "data-testid": "event",
        "data-event": r.text, title: r.at }, `${eventText(r)} · ${time}`);
    }
    if (r.direction === "in") {
      const rating = r.kind === "rating" && r.data && r.data.rating;
      return h("div", { class: "msg msg-customer", "data-testid": "msg-customer", "data-seq": r.seq },
        h("div", { class: "who" }, `Customer · ${time}`),
        h("div", { class: "bubble", lang },
          rating ? h("span", {}, `Rated ${rating}/5 `,
            h("span", { class: "stars", "aria-hidden": "true" },
              "★".repeat(rating) + "☆".repeat(5 - rating))) : r.text));
    }
    const agent = agentOf(r.author);
    const kind = (r.data && r.data.kind) || "text";
    const subtle = ["disclosure", "rating", "handoff"].includes(kind);
    const quick = r.data && Array.isArray(r.data.quick) && kind !== "rating"
      ? h("div", { class: "quick" }, r.data.quick.map((q) => h("span", {}, q))) : null;
    return h("div", {
      class: `msg ${agent ? "msg-agent" : "msg-bot"}${subtle ? " subtle" : ""}`,
      "data-testid": agent ? "msg-agent" : "msg-bot", "data-seq": r.seq,
    },
    h("div", { class: "who" }, `${agent ? capital(agent) : "Bot"}${kind !== "text" && kind !== "agent" ? ` · ${kind}` : ""} · ${time}`),
    h("div", { class: "bubble", lang }, r.text), quick);
  }

  function eventText(r) {
    const d = r.data || {};
    const who = capital(agentOf(r.author));
    switch (r.text) {
      case "handoff": return `Handed off · ${REASONS[d.reason] || d.reason}${d.detail ? `: ${d.detail}` : ""}`;
      case "claim": return `${who} claimed the conversation`;
      case "hand_back": return `${who} handed back to the bot${d.note ? `: ${d.note}` : ""}`;
      case "resolve": return `${who} resolved the conversation`;
      case "timeout": return `Nobody claimed in time · callback ticket ${d.ticket || ""}`;
      case "rating": return `Customer rated ${d.value}/5`;
      case "journey_restarted": return "New request started";
      case "state": return `state ${d.source || "∅"} → ${d.target}`;
      case "routed": return `routed to ${d.flow}`;
      default: {
        const extra = Object.entries(d).map(([k, v]) => `${k}=${valueText(v)}`).join(" ");
        return extra ? `${r.text} ${extra}` : r.text;
      }
    }
  }

  $("show-events").addEventListener("change", (ev) => {
    state.showEvents = ev.target.checked;
    if (state.detail) renderTranscript();
  });

  $("transcript").addEventListener("scroll", () => {
    const box = $("transcript");
    if (box.scrollHeight - box.scrollTop - box.clientHeight < 80) $("new-below").hidden = true;
  });
  $("new-below").addEventListener("click", () => {
    const box = $("transcript");
    box.scrollTop = box.scrollHeight;
    $("new-below").hidden = true;
  });

  // -- side panel -----------------------------------------------------------------------

  function renderSide() {
    const d = state.detail;
    const c = d.conversation;
    const mine = mineNow();
    const badge = $("owner-badge");
    const owner = {
      pending_human: "Waiting for an agent",
      human: mine ? "With you" : `With ${capital(c.owner_agent)}`,
      bot: "With the bot", resolved: "Resolved",
    }[c.owner] || c.owner;
    badge.textContent = owner;
    badge.className = `owner-badge owner-${mine ? "mine" : c.owner}`;
    badge.dataset.owner = c.owner;

    const inHand = c.owner === "pending_human" || c.owner === "human";
    $("side-reason").hidden = !c.reason;
    if (c.reason) {
      $("side-reason").className = `badge badge-${c.reason}`;
      $("side-reason").textContent = REASONS[c.reason] || c.reason;
      $("side-reason").dataset.reason = c.reason;
    }
    $("side-priority").hidden = c.priority !== "high" || !inHand;
    $("side-detail").textContent = c.detail || (inHand ? "" : "No open handoff.");

    $("act-claim").hidden = c.owner !== "pending_human";
    $("act-handback").hidden = !mine;
    $("act-resolve").hidden = !(c.owner === "pending_human" || mine);
    if (!inHand) closeConfirms();

    $("summary").textContent = d.summary || "—";

    const ents = $("entities");
    if (!d.entities.length) {
      ents.replaceChildren(h("p", { class: "muted" }, "Nothing collected yet."));
    } else {
      ents.replaceChildren(h("table", { class: "entities" }, h("tbody", {},
        d.entities.map((e) => h("tr", { "data-testid": "entity", "data-name": e.name },
          h("th", {}, e.name),
          h("td", {},
            h("span", { class: "value", "data-testid": "entity-value" }, valueText(e.value)),
            h("span", { class: "prov" },
              h("span", { class: `src src-${e.source}`, title: `source: ${e.source}` },
                SOURCES[e.source] || e.source), ` · turn ${e.turn}`),
            e.history.length > 1 ? h("details", {},
              h("summary", {}, `${e.history.length} changes`),
              h("ul", { class: "history" }, e.history.map((x) => h("li", {},
                `${valueText(x.previous)} → ${valueText(x.value)} (${x.source}, turn ${x.turn})`))))
              : null))))));
    }

    const results = Object.entries(d.results || {});
    $("results-card").hidden = !results.length;
    $("results").replaceChildren(...results.map(([name, value]) => h("details", {},
      h("summary", {}, name),
      value && typeof value === "object"
        ? h("dl", { class: "kv" }, Object.entries(value).flatMap(([k, v]) =>
          [h("dt", {}, k), h("dd", {}, valueText(v))]))
        : h("div", {}, valueText(value)))));

    const meta = [
      ["Channel", c.channel], ["Thread", c.thread], ["Flow", c.flow || "—"],
      ["State", c.state || "—"], ["Language", (c.language || "").toUpperCase()],
      ["Started", c.created_at ? new Date(c.created_at).toLocaleString() : "—"],
      ["ID", c.id],
    ];
    $("meta").replaceChildren(...meta.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  }

  function closeConfirms() {
    $("confirm-handback").hidden = true;
    $("confirm-resolve").hidden = true;
  }

  for (const btn of document.querySelectorAll("[data-cancel]")) {
    btn.addEventListener("click", closeConfirms);
  }

  async function act(action, body, success) {
    const id = state.selected;
    if (!id) return false;
    try {
      const res = await api("POST", `conversations/${encodeURIComponent(id)}/${action}`, body);
      if (state.detail && id === state.selected) {
        state.detail.conversation = res.conversation;
        state.detailAt = Date.now();
      }
      if (success) toast(success);
      await loadConversation(id, { quiet: true });
      return true;
    } catch (err) {
      if (err.status === 409) {
        // Someone else got there first: show the current state, and say so
        // unless a live update just did.
        await loadConversation(id, { quiet: true });
        if (Date.now() - (state.told.get(id) || 0) > 5000) toast(conflictText(err), "error");
      } else if (err.status !== 401) {
        toast(err.message, "error");
      }
      return false;
    }
  }

  function conflictText(err) {
    const c = state.detail && state.detail.conversation;
    if (c && c.owner === "human" && c.owner_agent !== state.agent) {
      return `${capital(c.owner_agent)} is already handling this conversation.`;
    }
    if (c && c.owner === "bot") return "The bot has this conversation now.";
    if (c && c.owner === "resolved") return "This conversation is already resolved.";
    return err.message.replace(/^cannot \S+ conversation \S+: /, "Not possible: ");
  }

  async function claim() {
    const c = state.detail && state.detail.conversation;
    if (!c || c.owner !== "pending_human") return;
    $("act-claim").disabled = true;
    const ok = await act("claim", {}, null);
    $("act-claim").disabled = false;
    if (ok) {
      setMode("reply");
      $("composer-input").focus();
    }
  }

  $("act-claim").addEventListener("click", claim);
  $("act-handback").addEventListener("click", () => {
    $("confirm-resolve").hidden = true;
    $("confirm-handback").hidden = false;
    $("handback-note").focus();
  });
  $("act-resolve").addEventListener("click", () => {
    $("confirm-handback").hidden = true;
    $("confirm-resolve").hidden = false;
    $("resolve-confirm").focus();
  });
  $("handback-confirm").addEventListener("click", async () => {
    const note = $("handback-note").value.trim();
    if (await act("hand_back", { note }, "Handed back to the bot.")) {
      $("handback-note").value = "";
      closeConfirms();
      setMode("reply");
    }
  });
  $("handback-note").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") { ev.preventDefault(); $("handback-confirm").click(); }
  });
  $("resolve-confirm").addEventListener("click", async () => {
    if (await act("resolve", {}, "Conversation resolved.")) {
      closeConfirms();
      setMode("reply");
    }
  });

  // -- composer -------------------------------------------------------------------------

  function setMode(mode) {
    state.mode = mode;
    $("composer").className = `composer mode-${mode}`;
    for (const t of document.querySelectorAll(".ctab")) {
      t.setAttribute("aria-selected", String(t.dataset.mode === mode));
    }
    renderComposer();
  }

  function renderComposer() {
    const c = state.detail && state.detail.conversation;
    const input = $("composer-input");
    const blocked = $("composer-blocked");
    let reason = null;
    if (!c) reason = "Loading…";
    else if (state.mode === "reply" && !mineNow()) {
      reason = c.owner === "pending_human" ? "Claim the conversation to reply to the customer."
        : c.owner === "human" ? `${capital(c.owner_agent)} is handling this conversation.`
          : c.owner === "bot" ? "The bot is handling this conversation."
            : "This conversation is resolved.";
    } else if (state.mode === "note" && !["pending_human", "human"].includes(c.owner)) {
      reason = "Notes can be added while a handoff is open.";
    }
    blocked.hidden = !reason;
    blocked.replaceChildren();
    if (reason) {
      blocked.append(h("span", {}, reason));
      if (c && c.owner === "pending_human" && state.mode === "reply") {
        blocked.append(h("button", { type: "button", class: "btn btn-primary btn-small",
          onclick: claim }, "Claim"));
      }
    }
    input.disabled = Boolean(reason);
    $("composer-send").disabled = Boolean(reason);
    $("composer-send").textContent = state.mode === "note" ? "Add note" : "Send";
    input.placeholder = state.mode === "note"
      ? "Write an internal note: only agents see it  (Ctrl+Enter to add)"
      : "Write a reply to the customer…  (Ctrl+Enter to send)";
  }

  for (const t of document.querySelectorAll(".ctab")) {
    t.addEventListener("click", () => { setMode(t.dataset.mode); $("composer-input").focus(); });
  }

  $("composer").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = $("composer-input");
    const text = input.value.trim();
    if (!text || input.disabled) return;
    const send = $("composer-send");
    send.disabled = true;
    const ok = await act(state.mode === "note" ? "note" : "reply", { text }, null);
    send.disabled = false;
    if (ok) input.value = "";
    renderComposer();
    input.focus();
    const box = $("transcript");
    box.scrollTop = box.scrollHeight;
  });

  $("composer-input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });

  // -- keyboard -------------------------------------------------------------------------

  function typing(target) {
    return target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA"
      || target.isContentEditable);
  }

  function moveSelection(step) {
    const items = [...document.querySelectorAll("#queue .qitem")];
    if (!items.length) return;
    const index = items.findIndex((el) => el.dataset.conversationId === state.selected);
    const next = items[Math.max(0, Math.min(items.length - 1, index < 0 ? 0 : index + step))];
    select(next.dataset.conversationId);
    next.scrollIntoView({ block: "nearest" });
  }

  document.addEventListener("keydown", (ev) => {
    if ($("app").hidden) return;
    if (ev.key === "Escape") {
      $("help").hidden = true;
      closeConfirms();
      if (typing(ev.target)) ev.target.blur();
      return;
    }
    if (ev.altKey && (ev.key === "n" || ev.key === "N")) {
      ev.preventDefault();
      setMode(state.mode === "note" ? "reply" : "note");
      $("composer-input").focus();
      return;
    }
    if (typing(ev.target) || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const actions = {
      j: () => moveSelection(1), ArrowDown: () => moveSelection(1),
      k: () => moveSelection(-1), ArrowUp: () => moveSelection(-1),
      c: claim,
      r: () => { if (state.selected) { setMode("reply"); $("composer-input").focus(); } },
      n: () => { if (state.selected) { setMode("note"); $("composer-input").focus(); } },
      e: () => { $("show-events").click(); },
      "?": () => { $("help").hidden = !$("help").hidden; },
    };
    const fn = actions[ev.key];
    if (fn) { ev.preventDefault(); fn(); }
  });

  $("help-button").addEventListener("click", () => { $("help").hidden = false; });
  $("help").addEventListener("click", (ev) => {
    if (ev.target === $("help") || ev.target.hasAttribute("data-close")) $("help").hidden = true;
  });

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && state.selected && state.unread.delete(state.selected)) renderQueue();
  });

  // -- boot -----------------------------------------------------------------------------

  api("GET", "me").then(start, () => showLogin());
})();
