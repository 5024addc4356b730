/*!
 * Helpline web chat widget. One script tag, no build step:
 *
 *   <script src="https://support.example.com/chat/widget.js"
 *           data-site="my-shop" data-title="My Shop" async></script>
 *
 * Options (data-* attributes of the script tag):
 *   data-server  Helpline base URL (default: where this script was loaded from)
 *   data-site    site id, 1-40 of A-Z a-z 0-9 _ . - (default "default")
 *   data-title   shop name shown in the header (default "Support")
 *   data-lang    "en" or "zh" (default: from the browser's language)
 *   data-accent  accent colour, any CSS colour (default indigo)
 *   data-open    "true" opens the panel on load
 *
 * The widget lives in a Shadow DOM, so the shop's CSS cannot break it (and it
 * cannot break the shop's). Protocol: docs/web-protocol.md. Test ids: same file.
 * JS API: window.HelplineChat.open() / .close() / .toggle() / .send(text).
 */
(function () {
  "use strict";

  if (window.HelplineChat && window.HelplineChat.loaded) return;

  // -------------------------------------------------------------------- config

  var script = document.currentScript ||
    document.querySelector('script[src*="/chat/widget.js"]') || { dataset: {}, src: "" };
  var data = script.dataset || {};
  var scriptOrigin = script.src ? new URL(script.src, location.href).origin : location.origin;
  var cfg = {
    server: (data.server || scriptOrigin).replace(/\/+$/, ""),
    site: data.site || "default",
    title: data.title || "Support",
    lang: data.lang || ((navigator.language || "en").toLowerCase().indexOf("zh") === 0 ? "zh" : "en"),
    accent: data.accent || "",
    open: data.open === "true"
  };
  var locale = cfg.lang === "zh" ? "zh-CN" : (navigator.language || "en");

  var PING_EVERY = 25000;      // app-level heartbeat (browsers cannot send WS pings)
  var PONG_WITHIN = 10000;     // no pong by then: the socket is dead, reconnect
  var BACKOFF_BASE = 1000;
  var BACKOFF_CAP = 30000;
  var MAX_TEXT = 4000;
  var KEEP_MESSAGES = 200;
  var STORE_KEY = "helpline-chat:" + cfg.server + ":" + cfg.site;

  var STRINGS = {
    en: {
      open: "Open chat", close: "Close chat", badge: "AI assistant",
      subtitle: "Online now", agent: "Support agent", you: "You",
      placeholder: "Type your message…", send: "Send message",
      connecting: "Connecting…", reconnecting: "Reconnecting…", offline: "You're offline. We'll reconnect automatically.", offlineShort: "Offline",
      online: "Online", typing: "The assistant is typing",
      welcomeTitle: "Hi there!", welcomeText: "Ask us about a refund, your parcel or your delivery address.",
      aiNotice: "You're chatting with an AI assistant. You can ask for a human at any time.",
      starters: ["I want a refund", "Where is my parcel?", "Change my delivery address"],
      rateTitle: "How did we do?", rateLow: "Poor", rateHigh: "Great",
      rate: function (n) { return "Rate " + n + " out of 5"; },
      rated: function (n) { return "Rated " + n + " of 5"; },
      sending: "Sending…", retrying: "Not sent yet, retrying…", failed: "Not sent",
      tooLong: "That message is too long. Please shorten it.",
      unread: function (n) { return n + " new message" + (n === 1 ? "" : "s"); },
      messages: "Conversation", powered: "Powered by Helpline", chatWith: "Chat with "
    },
    zh: {
      open: "打开聊天", close: "关闭聊天", badge: "AI 助手",
      subtitle: "在线", agent: "人工客服", you: "我",
      placeholder: "输入消息…", send: "发送",
      connecting: "正在连接…", reconnecting: "正在重新连接…", offline: "网络已断开，恢复后将自动重连。", offlineShort: "离线",
      online: "在线", typing: "助手正在输入",
      welcomeTitle: "您好！", welcomeText: "可以咨询退款、物流进度或修改收货地址。",
      aiNotice: "您正在与 AI 智能助手对话，可随时要求转接人工客服。",
      starters: ["我要退款", "我的快递到哪了？", "修改收货地址"],
      rateTitle: "请为本次服务打分", rateLow: "很差", rateHigh: "很好",
      rate: function (n) { return "评 " + n + " 分（满分 5 分）"; },
      rated: function (n) { return "已评 " + n + " 分"; },
      sending: "发送中…", retrying: "尚未发送，正在重试…", failed: "发送失败",
      tooLong: "消息太长，请精简后再发送。",
      unread: function (n) { return n + " 条新消息"; },
      messages: "会话记录", powered: "由 Helpline 提供支持", chatWith: "联系 "
    }
  };
  var T = STRINGS[cfg.lang] || STRINGS.en;

  // -------------------------------------------------------------------- state

  var state = load() || {};
  state.session = state.session || null;
  state.token = state.token || null;
  state.expiresAt = state.expiresAt || 0;
  state.lastSeq = state.lastSeq || 0;
  state.messages = state.messages || [];   // server messages, by seq
  state.pending = state.pending || [];     // customer frames not yet acked

  var ws = null;
  var status = "idle";          // idle | connecting | online | reconnecting | offline
  var attempts = 0;
  var reconnectTimer = null;
  var pingTimer = null;
  var pongTimer = null;
  var typingTimer = null;
  var typing = false;
  var isOpen = false;
  var started = false;
  var unread = 0;
  var ready = false;

  function load() {
    try { return JSON.parse(localStorage.getItem(STORE_KEY) || "null"); } catch (e) { return null; }
  }

  function save() {
    try {
      localStorage.setItem(STORE_KEY, JSON.stringify({
        session: state.session, token: state.token, expiresAt: state.expiresAt,
        lastSeq: state.lastSeq, messages: state.messages.slice(-KEEP_MESSAGES),
        pending: state.pending
      }));
    } catch (e) { /* private mode or full: the server still has everything */ }
  }

  function uid() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    return "c" + Date.now().toString(36) + Math.random().toString(36).slice(2, 12);
  }

  // -------------------------------------------------------------------- DOM

  var host = document.createElement("div");
  host.id = "helpline-chat";
  host.setAttribute("data-testid", "helpline-host");
  host.style.cssText = "all:initial;position:fixed;z-index:2147483000;right:0;bottom:0;width:0;height:0;visibility:hidden";
  var root = host.attachShadow({ mode: "open" });

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) return;
        if (k === "text") node.textContent = v;
        else if (k === "class") node.className = v;
        else if (k.indexOf("on") === 0) node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, v === true ? "" : v);
      });
    }
    (children || []).forEach(function (c) { if (c) node.appendChild(c); });
    return node;
  }

  function svg(path, size) {
    var ns = "http://www.w3.org/2000/svg";
    var s = document.createElementNS(ns, "svg");
    s.setAttribute("viewBox", "0 0 24 24");
    s.setAttribute("width", size || 24);
    s.setAttribute("height", size || 24);
    s.setAttribute("aria-hidden", "true");
    s.setAttribute("focusable", "false");
    var p = document.createElementNS(ns, "path");
    p.setAttribute("d", path);
    p.setAttribute("fill", "currentColor");
    s.appendChild(p);
    return s;
  }

  var ICON_CHAT = "M12 3C6.5 3 2 6.9 2 11.7c0 2.6 1.3 4.9 3.4 6.5-.1 1.2-.6 2.6-1.7 3.6 2.2 0 4-.9 5.1-1.9 1 .3 2.1.4 3.2.4 5.5 0 10-3.9 10-8.6S17.5 3 12 3z";
  var ICON_CLOSE = "M18.3 5.7a1 1 0 0 0-1.4 0L12 10.6 7.1 5.7a1 1 0 1 0-1.4 1.4l4.9 4.9-4.9 4.9a1 1 0 1 0 1.4 1.4l4.9-4.9 4.9 4.9a1 1 0 0 0 1.4-1.4L13.4 12l4.9-4.9a1 1 0 0 0 0-1.4z";
  var ICON_SEND = "M3.4 20.4 21 12 3.4 3.6 3.4 10l12.6 2-12.6 2z";
  var ICON_SPARK = "M12 2l1.9 5.6L19.5 9.5l-5.6 1.9L12 17l-1.9-5.6L4.5 9.5l5.6-1.9zM19 15l.9 2.6 2.6.9-2.6.9L19 22l-.9-2.6-2.6-.9 2.6-.9z";
  var ICON_INFO = "M12 2a10 10 0 1 0 0 20 10 10 0 0 0 0-20zm1 15h-2v-6h2zm0-8h-2V7h2z";
  var ICON_PERSON = "M12 12a4.5 4.5 0 1 0 0-9 4.5 4.5 0 0 0 0 9zm0 2c-4.4 0-8 2.2-8 5v2h16v-2c0-2.8-3.6-5-8-5z";
  var ICON_STAR = "M12 2.8l2.8 5.9 6.4.8-4.7 4.4 1.2 6.3L12 17.1l-5.7 3.1 1.2-6.3L2.8 9.5l6.4-.8z";

  var css = el("link", { rel: "stylesheet", href: cfg.server + "/chat/widget.css" });
  var reveal = function () { host.style.visibility = "visible"; };
  css.addEventListener("load", reveal);
  css.addEventListener("error", reveal);
  setTimeout(reveal, 3000);

  var badge = el("span", { class: "hl-unread", "data-testid": "helpline-unread", hidden: true });
  var launcher = el("button", {
    class: "hl-launcher", type: "button", "data-testid": "helpline-launcher",
    "aria-label": T.open, "aria-expanded": "false", "aria-controls": "hl-panel",
    onclick: function () { toggle(); }
  }, [el("span", { class: "hl-icon-open" }, [svg(ICON_CHAT, 28)]),
      el("span", { class: "hl-icon-close" }, [svg(ICON_CLOSE, 26)]), badge]);

  var statusDot = el("span", { class: "hl-dot" });
  var subtitle = el("span", { class: "hl-subtitle-text", text: T.subtitle });
  var closeBtn = el("button", {
    class: "hl-close", type: "button", "aria-label": T.close, "data-testid": "helpline-close",
    onclick: function () { close(); }
  }, [svg(ICON_CLOSE, 20)]);
  var header = el("header", { class: "hl-header" }, [
    el("div", { class: "hl-avatar", "aria-hidden": "true" }, [svg(ICON_SPARK, 22)]),
    el("div", { class: "hl-heading" }, [
      el("h2", { class: "hl-title", id: "hl-title", text: cfg.title }),
      el("div", { class: "hl-subtitle" }, [
        el("span", { class: "hl-badge", "data-testid": "helpline-ai-badge" }, [svg(ICON_SPARK, 11), el("span", { text: T.badge })]),
        statusDot, subtitle])
    ]),
    closeBtn
  ]);

  var statusBar = el("div", {
    class: "hl-status", role: "status", "aria-live": "polite", "data-testid": "helpline-status",
    "data-status": "idle"
  });

  var list = el("div", {
    class: "hl-messages", id: "hl-messages", role: "log", "aria-live": "polite",
    "aria-relevant": "additions", "aria-label": T.messages, tabindex: "0",
    "data-testid": "helpline-messages"
  });
  var typingRow = el("div", {
    class: "hl-typing", "data-testid": "helpline-typing", hidden: true, role: "status",
    "aria-label": T.typing
  }, [el("span"), el("span"), el("span")]);
  var actions = el("div", { class: "hl-actions", "data-testid": "helpline-actions" });

  var input = el("textarea", {
    class: "hl-input", rows: "1", maxlength: String(MAX_TEXT), placeholder: T.placeholder,
    "aria-label": T.placeholder, "data-testid": "helpline-input", enterkeyhint: "send"
  });
  var sendBtn = el("button", {
    class: "hl-send", type: "submit", "aria-label": T.send, "data-testid": "helpline-send",
    disabled: true
  }, [svg(ICON_SEND, 20)]);
  var notice = el("div", { class: "hl-flash", role: "alert", "data-testid": "helpline-flash", hidden: true });
  var form = el("form", { class: "hl-composer", onsubmit: function (e) { e.preventDefault(); submit(); } },
                [input, sendBtn]);

  var panel = el("section", {
    class: "hl-panel", id: "hl-panel", role: "dialog", "aria-labelledby": "hl-title",
    "data-testid": "helpline-panel", hidden: true
  }, [header, statusBar,
      el("div", { class: "hl-scroll" }, [list, typingRow, actions]),
      notice, form,
      el("div", { class: "hl-powered", text: T.powered })]);

  var wrapper = el("div", { class: "hl-root", lang: cfg.lang === "zh" ? "zh-CN" : "en" },
                   [panel, launcher]);
  if (cfg.accent) wrapper.style.setProperty("--hl-accent", cfg.accent);
  root.appendChild(css);
  root.appendChild(wrapper);

  input.addEventListener("input", function () { autosize(); sendBtn.disabled = !input.value.trim(); });
  input.addEventListener("keydown", function (e) {
    // Enter sends; Shift+Enter is a new line; never while an IME is composing (Chinese input).
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      submit();
    }
  });
  wrapper.addEventListener("keydown", function (e) {
    if (e.key === "Escape" && isOpen) { close(); launcher.focus(); }
  });

  function autosize() {
    input.style.height = "auto";
    input.style.height = Math.min(input.scrollHeight, 120) + "px";
  }

  // -------------------------------------------------------------------- rendering

  var nodes = {};   // render key -> element (bubbles are built once)
  var timeFormat = new Intl.DateTimeFormat(locale, { hour: "2-digit", minute: "2-digit" });

  function fmtTime(ts) {
    var d = ts ? new Date(ts) : new Date();
    return isNaN(d.getTime()) ? "" : timeFormat.format(d);
  }

  function stars(n) {
    var s = "";
    for (var i = 1; i <= 5; i++) s += i <= n ? "★" : "☆";
    return s;
  }

  function isNotice(m) {
    return m.kind === "disclosure" || m.kind === "notice" || m.kind === "handoff" || m.author === "system";
  }

  function buildBubble(m, pending) {
    var author = pending ? "customer" : m.author;
    var rating = m.kind === "rating" && author === "customer";
    var text = rating ? stars(parseInt(m.text || m.value, 10) || 0) : m.text;
    var item = el("div", {
      class: "hl-msg hl-" + author + (isNotice(m) ? " hl-notice hl-notice-" + m.kind : "") +
             (pending ? " hl-pending" : ""),
      "data-testid": "helpline-message", "data-author": author, "data-kind": m.kind || "text",
      "data-seq": pending ? null : String(m.seq), "data-id": m.id || null
    });
    if (isNotice(m)) {
      item.appendChild(el("span", { class: "hl-notice-icon" },
                          [svg(m.kind === "handoff" ? ICON_PERSON : ICON_INFO, 16)]));
      item.appendChild(el("span", { class: "hl-notice-text", text: text }));
      return item;
    }
    if (author === "agent") item.appendChild(el("div", { class: "hl-label", text: T.agent }));
    var bubble = el("div", { class: "hl-bubble" + (rating ? " hl-stars" : ""), text: text });
    if (rating) bubble.setAttribute("aria-label", T.rated(parseInt(m.text || m.value, 10)));
    item.appendChild(bubble);
    item.appendChild(el("div", { class: "hl-meta" }, [
      el("time", { datetime: m.ts || "", text: fmtTime(m.ts) }),
      pending ? el("span", { class: "hl-state", "data-testid": "helpline-pending", text: T.sending }) : null
    ]));
    return item;
  }

  function render() {
    var seen = {};
    var order = [];
    state.messages.forEach(function (m) {
      var key = "s" + m.seq;
      seen[key] = true;
      if (!nodes[key]) nodes[key] = buildBubble(m, false);
      order.push(nodes[key]);
    });
    state.pending.forEach(function (p) {
      var key = "p" + p.id;
      seen[key] = true;
      if (!nodes[key]) nodes[key] = buildBubble(p, true);
      var stateEl = nodes[key].querySelector(".hl-state");
      if (stateEl) {
        stateEl.textContent = p.failed ? T.failed : (p.retry ? T.retrying : T.sending);
        nodes[key].classList.toggle("hl-failed", !!p.failed);
      }
      order.push(nodes[key]);
    });
    Object.keys(nodes).forEach(function (k) {
      if (!seen[k]) { nodes[k].remove(); delete nodes[k]; }
    });
    var nearBottom = scroller().scrollHeight - scroller().scrollTop - scroller().clientHeight < 120;
    if (!order.length) {
      list.replaceChildren(welcome());
    } else {
      if (list.firstChild && list.firstChild.classList.contains("hl-welcome")) list.firstChild.remove();
      order.forEach(function (node, i) {
        if (list.children[i] !== node) list.insertBefore(node, list.children[i] || null);
      });
    }
    typingRow.hidden = !typing;
    renderActions();
    if (nearBottom || justSent) scrollToBottom();
    justSent = false;
  }

  var justSent = false;
  function scroller() { return list.parentNode; }
  function scrollToBottom() {
    var s = scroller();
    requestAnimationFrame(function () { s.scrollTop = s.scrollHeight; });
  }

  function welcome() {
    return el("div", { class: "hl-welcome", "data-testid": "helpline-welcome" }, [
      el("div", { class: "hl-welcome-title", text: T.welcomeTitle }),
      el("p", { text: T.welcomeText }),
      el("p", { class: "hl-ai-notice", "data-testid": "helpline-ai-notice" },
         [svg(ICON_INFO, 14), el("span", { text: T.aiNotice })]),
      el("div", { class: "hl-chips" }, T.starters.map(function (s) {
        return el("button", {
          class: "hl-chip", type: "button", "data-testid": "helpline-starter", text: s,
          onclick: function () { sendText(s); }
        });
      }))
    ]);
  }

  function lastMessage() {
    return state.messages.length ? state.messages[state.messages.length - 1] : null;
  }

  function renderActions() {
    actions.replaceChildren();
    var last = lastMessage();
    if (!last || last.author === "customer" || state.pending.length) return;
    var quick = last.quick_replies || [];
    if (!quick.length) return;
    var ratings = quick.filter(function (q) { return /^rating:[1-5]$/.test(q.payload); });
    if (ratings.length === quick.length) {
      actions.appendChild(ratingRow(ratings));
      return;
    }
    actions.appendChild(el("div", { class: "hl-chips", role: "group" }, quick.map(function (q) {
      return el("button", {
        class: "hl-chip", type: "button", "data-testid": "helpline-quick-reply",
        "data-payload": q.payload, text: q.label,
        onclick: function () { sendFrame({ type: "quick_reply", payload: q.payload, text: q.label }); }
      });
    })));
  }

  function ratingRow(ratings) {
    var buttons = [];
    var row = el("div", { class: "hl-rating-stars", role: "group", "aria-label": T.rateTitle });
    ratings.forEach(function (q) {
      var n = parseInt(q.payload.split(":")[1], 10);
      var b = el("button", {
        class: "hl-star", type: "button", "data-testid": "helpline-rating-" + n,
        "data-rating": String(n), "aria-label": T.rate(n), title: T.rate(n),
        onclick: function () { sendFrame({ type: "rating", value: n, kind: "rating", text: String(n) }); },
        onmouseenter: function () { light(n); }, onfocus: function () { light(n); },
        onmouseleave: function () { light(0); }, onblur: function () { light(0); }
      }, [svg(ICON_STAR, 30), el("span", { class: "hl-star-num", text: String(n) })]);
      buttons.push(b);
      row.appendChild(b);
    });
    function light(n) {
      buttons.forEach(function (b, i) { b.classList.toggle("hl-lit", i < n); });
    }
    return el("div", { class: "hl-rating", "data-testid": "helpline-rating" }, [
      el("div", { class: "hl-rating-title", text: T.rateTitle }), row,
      el("div", { class: "hl-rating-scale" }, [el("span", { text: T.rateLow }), el("span", { text: T.rateHigh })])
    ]);
  }

  function setStatus(next) {
    status = next;
    statusBar.setAttribute("data-status", next);
    wrapper.setAttribute("data-status", next);
    var text = { connecting: T.connecting, reconnecting: T.reconnecting, offline: T.offline }[next] || "";
    statusBar.textContent = text;
    statusBar.hidden = next !== "reconnecting" && next !== "offline";
    subtitle.textContent = { connecting: T.connecting, reconnecting: T.reconnecting,
                             offline: T.offlineShort }[next] || T.subtitle;
    statusDot.className = "hl-dot hl-dot-" + next;
  }

  function flash(text, tone) {
    notice.textContent = text;
    notice.setAttribute("data-tone", tone || "error");
    notice.hidden = false;
    clearTimeout(flash.timer);
    flash.timer = setTimeout(function () { notice.hidden = true; }, 5000);
  }

  function setUnread(n) {
    unread = n;
    badge.hidden = !n;
    badge.textContent = n > 9 ? "9+" : String(n);
    launcher.setAttribute("aria-label", n ? T.open + " (" + T.unread(n) + ")" : T.open);
  }

  // -------------------------------------------------------------------- panel

  function open() {
    if (isOpen) return;
    isOpen = true;
    panel.hidden = false;
    wrapper.classList.add("hl-open");
    launcher.setAttribute("aria-expanded", "true");
    launcher.setAttribute("aria-label", T.close);
    setUnread(0);
    ensureStarted();
    render();
    scrollToBottom();
    setTimeout(function () { input.focus(); }, 50);
  }

  function close() {
    if (!isOpen) return;
    isOpen = false;
    panel.hidden = true;
    wrapper.classList.remove("hl-open");
    launcher.setAttribute("aria-expanded", "false");
    setUnread(0);
  }

  function toggle() { if (isOpen) close(); else open(); }

  // -------------------------------------------------------------------- sending

  function submit() {
    var text = input.value.trim();
    if (!text) return;
    if (text.length > MAX_TEXT) { flash(T.tooLong); return; }
    input.value = "";
    autosize();
    sendBtn.disabled = true;
    sendText(text);
  }

  function sendText(text) {
    sendFrame({ type: "message", text: text });
  }

  function sendFrame(p) {
    p.id = uid();
    p.ts = new Date().toISOString();
    p.kind = p.kind || "text";
    state.pending.push(p);
    save();
    justSent = true;
    render();
    ensureStarted();
    transmit(p);
  }

  function wire(p) {
    if (p.type === "rating") return { type: "rating", id: p.id, value: p.value };
    if (p.type === "quick_reply") return { type: "quick_reply", id: p.id, payload: p.payload };
    return { type: "message", id: p.id, text: p.text };
  }

  function transmit(p) {
    if (ws && ready && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(wire(p)));
    // Otherwise it stays pending and goes out (same id) once the socket is ready.
  }

  function flushPending() {
    state.pending.forEach(function (p) { if (!p.failed) transmit(p); });
  }

  // -------------------------------------------------------------------- receiving

  function addMessage(m) {
    if (typeof m.seq !== "number") return false;
    for (var i = state.messages.length - 1; i >= 0; i--) {
      if (state.messages[i].seq === m.seq) return false;          // de-duplicate by seq
      if (state.messages[i].seq < m.seq) break;
    }
    var at = state.messages.length;
    while (at > 0 && state.messages[at - 1].seq > m.seq) at--;
    state.messages.splice(at, 0, m);
    if (m.author === "customer" && m.id) dropPending(m.id);
    state.lastSeq = Math.max(state.lastSeq, m.seq);
    return true;
  }

  function dropPending(id) {
    var before = state.pending.length;
    state.pending = state.pending.filter(function (p) { return p.id !== id; });
    return before !== state.pending.length;
  }

  function onFrame(f) {
    lastHeard = Date.now();
    switch (f.type) {
      case "ready":
        ready = true;
        attempts = 0;
        setStatus("online");
        flushPending();
        break;
      case "resync":
        state.messages = [];
        f.messages.forEach(addMessage);
        state.lastSeq = Math.max(f.last_seq || 0, state.lastSeq);
        break;
      case "message":
        if (addMessage(f) && f.author !== "customer" && !isOpen) setUnread(unread + 1);
        break;
      case "ack":
        var p = state.pending.filter(function (x) { return x.id === f.id; })[0];
        if (p) {
          dropPending(f.id);
          addMessage({ seq: f.seq, id: f.id, author: "customer", kind: p.type === "rating" ? "rating" : "text",
                       text: p.type === "rating" ? String(p.value) : (p.type === "quick_reply" ? p.payload : p.text),
                       quick_replies: [], ts: p.ts });
        }
        state.lastSeq = Math.max(state.lastSeq, f.seq);
        break;
      case "typing":
        typing = !!f.on;
        clearTimeout(typingTimer);
        if (typing) typingTimer = setTimeout(function () { typing = false; render(); }, 30000);
        break;
      case "error":
        onError(f);
        break;
      case "notice":
        flash(f.text, "info");   // passing news (e.g. busy); not part of the log
        return;
      case "pong":
        clearTimeout(pongTimer);
        return;
      default:
        return;   // newer servers may send frames this widget does not know
    }
    save();
    render();
  }

  function onError(f) {
    var p = f.id ? state.pending.filter(function (x) { return x.id === f.id; })[0] : null;
    if (p && f.retryable) {
      p.retry = true;
      setTimeout(function () { transmit(p); }, 1500 + Math.random() * 2500);
    } else if (p) {
      p.failed = true;
      if (f.code === "too_long") flash(T.tooLong);
      setTimeout(function () { dropPending(p.id); save(); render(); }, 6000);
    }
  }

  // -------------------------------------------------------------------- connection

  var lastHeard = 0;

  function ensureStarted() {
    if (started) return;
    started = true;
    connect();
  }

  function getSession() {
    var fresh = state.token && state.expiresAt * 1000 - Date.now() > 60000;
    if (fresh) return Promise.resolve();
    return fetch(cfg.server + "/chat/session", {
      method: "POST", headers: { "Content-Type": "application/json" }, credentials: "omit",
      body: JSON.stringify({ site: cfg.site, token: state.token || undefined })
    }).then(function (r) {
      if (!r.ok) throw new Error("session " + r.status);
      return r.json();
    }).then(function (s) {
      if (s.session !== state.session) {
        // A new session (first visit, or the old one could not continue): start clean.
        state.messages = [];
        state.lastSeq = 0;
        nodes = {};
        list.replaceChildren();
      }
      state.session = s.session;
      state.token = s.token;
      state.expiresAt = s.expires_at;
      save();
    });
  }

  function wsUrl() {
    return cfg.server.replace(/^http/, "ws") + "/chat/ws";
  }

  function connect() {
    clearTimeout(reconnectTimer);
    if (ws) return;
    setStatus(attempts ? "reconnecting" : "connecting");
    getSession().then(openSocket, function () { scheduleReconnect(); });
  }

  function openSocket() {
    var sock;
    try { sock = new WebSocket(wsUrl()); } catch (e) { scheduleReconnect(); return; }
    ws = sock;
    ready = false;
    sock.onopen = function () {
      sock.send(JSON.stringify({ type: "auth", token: state.token, last_seq: state.lastSeq }));
      startHeartbeat(sock);
    };
    sock.onmessage = function (ev) {
      if (typeof ev.data !== "string") return;
      var f;
      try { f = JSON.parse(ev.data); } catch (e) { return; }
      onFrame(f);
    };
    sock.onclose = function (ev) {
      if (ws !== sock) return;
      ws = null;
      ready = false;
      typing = false;
      stopHeartbeat();
      if (ev.code === 4001) state.expiresAt = 0;   // renew (the old token continues the session)
      render();
      scheduleReconnect();
    };
    sock.onerror = function () { /* onclose follows */ };
  }

  function scheduleReconnect() {
    clearTimeout(reconnectTimer);
    attempts += 1;
    setStatus(navigator.onLine === false ? "offline" : "reconnecting");
    // Exponential backoff with full jitter, capped (thundering herds after a restart).
    var ceiling = Math.min(BACKOFF_CAP, BACKOFF_BASE * Math.pow(2, Math.min(attempts - 1, 6)));
    var delay = attempts === 1 ? 250 + Math.random() * 750 : ceiling / 2 + Math.random() * ceiling / 2;
    reconnectTimer = setTimeout(connect, delay);
  }

  function startHeartbeat(sock) {
    stopHeartbeat();
    pingTimer = setInterval(function () {
      if (sock.readyState !== WebSocket.OPEN) return;
      sock.send('{"type":"ping"}');
      clearTimeout(pongTimer);
      pongTimer = setTimeout(function () {
        // No pong: the connection is dead even if the browser has not noticed.
        try { sock.close(4000, "heartbeat timeout"); } catch (e) { /* ignore */ }
        if (ws === sock) sock.onclose({ code: 1006 });
      }, PONG_WITHIN);
    }, PING_EVERY);
  }

  function stopHeartbeat() {
    clearInterval(pingTimer);
    clearTimeout(pongTimer);
  }

  window.addEventListener("online", function () {
    if (started && !ws) { attempts = 0; connect(); }
  });
  window.addEventListener("offline", function () { if (!ready) setStatus("offline"); });
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible" && started && !ws) connect();
  });

  // -------------------------------------------------------------------- start

  function mount() {
    (document.body || document.documentElement).appendChild(host);
    setStatus("idle");
    render();
    if (cfg.open) open();
    // A returning visitor with a conversation reconnects at once (agent replies, unread).
    else if (state.session && (state.messages.length || state.pending.length)) ensureStarted();
  }

  window.HelplineChat = {
    loaded: true, open: open, close: close, toggle: toggle,
    send: function (text) { open(); sendText(String(text)); },
    get status() { return status; }, get session() { return state.session; }
  };

  if (document.body) mount();
  else document.addEventListener("DOMContentLoaded", mount);
})();
