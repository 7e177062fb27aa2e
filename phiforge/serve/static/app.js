// phiforge chat page: plain JavaScript, no framework, no build step, nothing loaded from elsewhere.
// Safety rule: model (and user) text reaches the DOM only as text nodes (textContent / createTextNode), built by
// renderMarkdown below; nothing here assigns innerHTML, so a reply that contains <script> or <img onerror> is
// shown as those characters. The server's Content-Security-Policy (page.py) would block inline script anyway.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const STORE = "phiforge.chat.v1"; // conversations and settings
  const KEY = "phiforge.apiKey"; // the --api-key the user typed in, sent as "Authorization: Bearer"
  const DEFAULTS = { system: "", temperature: 0.7, top_p: 1, max_tokens: 512, model: "" };

  let state = load();
  let running = null; // {controller, reply, body, stats} while an answer streams

  function load() {
    try {
      const s = JSON.parse(localStorage.getItem(STORE));
      if (s && Array.isArray(s.conversations)) return { ...s, settings: { ...DEFAULTS, ...s.settings } };
    } catch (e) { /* unreadable: start afresh */ }
    return { conversations: [], current: null, settings: { ...DEFAULTS } };
  }

  function save() {
    try { localStorage.setItem(STORE, JSON.stringify(state)); } catch (e) { setStatus("not saved: " + e.message, true); }
  }

  function setStatus(text, error = false) {
    $("status").textContent = text;
    $("status").classList.toggle("error", error);
  }

  function current() { return state.conversations.find((c) => c.id === state.current) || null; }

  // ---- Markdown, safely: a small subset (code fences, inline code, bold, italic, headings, lists, quotes, links),
  // every piece of text a text node. Unfinished constructs (a fence still streaming) render as far as they go.
  function renderMarkdown(text) {
    const out = document.createDocumentFragment();
    const lines = text.split("\n");
    let para = null, list = null;
    const close = () => { para = null; list = null; };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+#.-]*)\s*$/);
      if (fence) {
        const code = [];
        for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) code.push(lines[i]);
        out.append(codeBlock(code.join("\n"), fence[1]));
        close();
        continue;
      }
      if (!line.trim()) { close(); continue; }
      let m;
      if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
        const h = document.createElement("h" + m[1].length);
        h.append(inline(m[2]));
        out.append(h);
        close();
      } else if ((m = line.match(/^\s*(?:([-*+])|(\d+)[.)])\s+(.*)$/))) {
        const tag = m[1] ? "UL" : "OL";
        if (!list || list.tagName !== tag) {
          list = document.createElement(tag);
          if (m[2] && m[2] !== "1") list.start = Number(m[2]);
          out.append(list);
        }
        const li = document.createElement("li");
        li.append(inline(m[3]));
        list.append(li);
        para = null;
      } else if ((m = line.match(/^>\s?(.*)$/))) {
        const q = document.createElement("blockquote");
        q.append(inline(m[1]));
        out.append(q);
        close();
      } else {
        if (para) para.append(document.createElement("br"));
        else { para = document.createElement("p"); out.append(para); list = null; }
        para.append(inline(line));
      }
    }
    return out;
  }

  const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([^*]+)\*\*|\*([^*\s](?:[^*]*[^*\s])?)\*|\[([^\]]+)\]\(([^)\s]+)\)/g;

  function inline(text) {
    const out = document.createDocumentFragment();
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      out.append(document.createTextNode(text.slice(last, m.index)));
      last = m.index + m[0].length;
      let node;
      if (m[1]) { node = document.createElement("code"); node.textContent = m[2]; }
      else if (m[3]) { node = document.createElement("strong"); node.textContent = m[3]; }
      else if (m[4]) { node = document.createElement("em"); node.textContent = m[4]; }
      else if (/^https?:\/\//i.test(m[6])) { // only web links: a javascript: URL stays text
        node = document.createElement("a");
        node.href = m[6];
        node.rel = "noopener noreferrer nofollow";
        node.target = "_blank";
        node.textContent = m[5];
      } else node = document.createTextNode(m[0]);
      out.append(node);
    }
    out.append(document.createTextNode(text.slice(last)));
    return out;
  }

  function codeBlock(code, lang) {
    const pre = document.createElement("pre");
    const c = document.createElement("code");
    if (lang) c.dataset.lang = lang;
    c.textContent = code;
    pre.append(c, copyButton(() => code));
    return pre;
  }

  function copyButton(get) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "copy";
    b.textContent = "Copy";
    b.addEventListener("click", async () => {
      b.textContent = (await copyText(get())) ? "Copied" : "Copy failed";
      setTimeout(() => { b.textContent = "Copy"; }, 1200);
    });
    return b;
  }

  async function copyText(text) {
    try { await navigator.clipboard.writeText(text); return true; } catch (e) { /* not a secure context */ }
    const t = document.createElement("textarea"); // the old way, for http:// on a LAN address
    t.value = text;
    document.body.append(t);
    t.select();
    const ok = document.execCommand("copy");
    t.remove();
    return ok;
  }

  // ---- the conversation on screen
  function messageNode(m) {
    const div = document.createElement("div");
    div.className = "msg " + m.role;
    const head = document.createElement("div");
    head.className = "role";
    const who = document.createElement("span");
    who.textContent = m.role === "user" ? "You" : "Assistant";
    head.append(who, copyButton(() => m.content));
    const body = document.createElement("div");
    body.className = "body";
    if (m.role === "user") body.textContent = m.content; // what was typed, exactly (white-space: pre-wrap)
    else body.append(renderMarkdown(m.content));
    const stats = document.createElement("div");
    stats.className = "stats";
    showStats(stats, m);
    div.append(head, body, stats);
    return { div, body, stats };
  }

  function showStats(el, m) {
    const s = m.stats, parts = [];
    if (s) {
      parts.push(`${s.approx ? "≈" : ""}${s.tokens} token${s.tokens === 1 ? "" : "s"}`);
      if (s.tps != null) parts.push(`${s.tps.toFixed(1)} tok/s`);
      if (s.ttft_ms != null) parts.push(`first token ${Math.round(s.ttft_ms)} ms`);
      if (s.finish === "length") parts.push("cut at max tokens");
    }
    if (m.stopped) parts.push("stopped");
    if (m.error) parts.push("error: " + m.error);
    el.textContent = parts.join(" · ");
    el.classList.toggle("error", !!m.error);
  }

  function renderConversation() {
    const conv = current();
    $("title").textContent = conv ? conv.title : "New chat";
    const nodes = conv ? conv.messages.map((m) => messageNode(m).div) : [];
    $("messages").replaceChildren(...nodes);
    $("messages").scrollTop = $("messages").scrollHeight;
    renderList();
  }

  function renderList() {
    const items = state.conversations.map((c) => {
      const li = document.createElement("li");
      li.classList.toggle("current", c.id === state.current);
      const open = document.createElement("button");
      open.type = "button";
      open.className = "open";
      open.textContent = c.title;
      open.addEventListener("click", () => {
        if (running) return;
        state.current = c.id;
        save();
        renderConversation();
        $("app").classList.remove("sidebar-open");
      });
      const del = document.createElement("button");
      del.type = "button";
      del.className = "delete";
      del.title = "Delete this conversation";
      del.textContent = "×";
      del.addEventListener("click", () => {
        if (running) return;
        state.conversations = state.conversations.filter((x) => x !== c);
        if (state.current === c.id) state.current = null;
        save();
        renderConversation();
      });
      li.append(open, del);
      return li;
    });
    $("conversations").replaceChildren(...items);
  }

  // ---- the API: every call carries the stored key; a 401 asks for one and tries again
  async function api(path, options = {}) {
    for (;;) {
      const headers = { ...(options.headers || {}) };
      const key = localStorage.getItem(KEY);
      if (key) headers.Authorization = "Bearer " + key;
      const r = await fetch(path, { ...options, headers });
      if (r.status !== 401) return r;
      await askKey(key !== null);
    }
  }

  function askKey(refused) {
    return new Promise((resolve, reject) => {
      const dialog = $("key-dialog"), form = $("key-form");
      $("key-error").hidden = !refused;
      $("key-input").value = "";
      const done = (ok) => {
        form.removeEventListener("submit", onSubmit);
        dialog.removeEventListener("cancel", onCancel);
        ok ? resolve() : reject(new Error("this server needs an API key"));
      };
      const onSubmit = () => { localStorage.setItem(KEY, $("key-input").value.trim()); done(true); };
      const onCancel = () => done(false);
      form.addEventListener("submit", onSubmit);
      dialog.addEventListener("cancel", onCancel);
      if (!dialog.open) dialog.showModal();
    });
  }

  async function errorText(r) {
    try { return (await r.json()).error.message; } catch (e) { return `HTTP ${r.status}`; }
  }

  async function loadModels() {
    try {
      const r = await api("/v1/models");
      if (!r.ok) throw new Error(await errorText(r));
      const models = (await r.json()).data;
      $("model").replaceChildren(...models.map((m) => {
        const o = document.createElement("option");
        o.value = m.id;
        o.textContent = m.id;
        return o;
      }));
      if (models.some((m) => m.id === state.settings.model)) $("model").value = state.settings.model;
      state.settings.model = $("model").value;
      const card = models.find((m) => m.id === $("model").value);
      setStatus(card && card.max_model_len ? `context ${card.max_model_len} tokens` : "");
      $("app").dataset.ready = "1"; // for tests and scripts: the page has talked to the server
    } catch (e) {
      setStatus("cannot list models: " + e.message, true);
    }
  }

  // ---- sending and streaming
  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
  }

  async function send() {
    const text = $("input").value;
    if (!text.trim() || running) return;
    let conv = current();
    if (!conv) {
      conv = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "", messages: [] };
      state.conversations.unshift(conv);
      state.current = conv.id;
    }
    if (!conv.title) conv.title = text.trim().split("\n")[0].slice(0, 60);
    conv.messages.push({ role: "user", content: text });
    const reply = { role: "assistant", content: "" };
    conv.messages.push(reply);
    $("input").value = "";
    save();
    renderConversation();
    const node = $("messages").lastElementChild;
    await stream(conv, reply, node.querySelector(".body"), node.querySelector(".stats"));
  }

  async function stream(conv, reply, body, stats) {
    const s = state.settings;
    const messages = s.system.trim() ? [{ role: "system", content: s.system }] : [];
    for (const m of conv.messages) {
      if (m !== reply && m.content) messages.push({ role: m.role, content: m.content });
    }
    const request = { model: s.model || undefined, messages, stream: true, stream_options: { include_usage: true },
                      temperature: s.temperature, top_p: s.top_p, max_tokens: s.max_tokens };
    const controller = new AbortController();
    running = { controller, reply };
    setBusy(true);
    const t0 = performance.now();
    let first = null, pieces = 0, usage = null, finish = null, queued = false;
    const paint = () => { // at most once a frame: long answers stay cheap to show
      if (queued) return;
      queued = true;
      requestAnimationFrame(() => {
        queued = false;
        const box = $("messages"), atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
        body.replaceChildren(renderMarkdown(reply.content));
        if (atEnd) box.scrollTop = box.scrollHeight;
      });
    };
    try {
      const r = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(request),
        headers: { "Content-Type": "application/json" }, signal: controller.signal });
      if (!r.ok) throw new Error(await errorText(r));
      const reader = r.body.getReader(), decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let end;
        while ((end = buf.indexOf("\n\n")) >= 0) { // one server-sent event per blank-line-terminated block
          const event = buf.slice(0, end);
          buf = buf.slice(end + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const obj = JSON.parse(data);
            if (obj.error) throw new Error(obj.error.message);
            if (obj.usage) usage = obj.usage;
            const choice = obj.choices && obj.choices[0];
            if (!choice) continue;
            if (choice.delta && choice.delta.content) {
              if (first === null) first = performance.now();
              pieces++;
              reply.content += choice.delta.content;
              paint();
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    } catch (e) {
      if (e.name === "AbortError") reply.stopped = true; // Stop: the closed connection cancels it on the server
      else reply.error = e.message;
    } finally {
      const end = performance.now();
      // a stopped stream gets no usage chunk: count the text pieces (about one per token; shown as ≈)
      const tokens = usage ? usage.completion_tokens : pieces;
      // tokens/s of decoding: the tokens after the first over the time after the first (prefill is the TTFT)
      reply.stats = { tokens, approx: !usage, finish, ttft_ms: first === null ? null : first - t0,
                      tps: first !== null && tokens > 1 && end > first ? (tokens - 1) / ((end - first) / 1000) : null };
      running = null;
      setBusy(false);
      body.replaceChildren(renderMarkdown(reply.content));
      showStats(stats, reply);
      save();
    }
  }

  // ---- settings and controls
  function bindSettings() {
    const fields = [["system", "system", String], ["temperature", "temperature", Number], ["top-p", "top_p", Number],
                    ["max-tokens", "max_tokens", (v) => Math.max(1, Math.round(Number(v)))]];
    for (const [id, key, parse] of fields) {
      $(id).value = state.settings[key];
      $(id).addEventListener("change", () => {
        const v = parse($(id).value);
        state.settings[key] = typeof v === "number" && !Number.isFinite(v) ? DEFAULTS[key] : v;
        save();
      });
    }
    $("model").addEventListener("change", () => { state.settings.model = $("model").value; save(); });
  }

  function init() {
    bindSettings();
    $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
    $("input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
    });
    $("stop").addEventListener("click", () => { if (running) running.controller.abort(); });
    $("new-chat").addEventListener("click", () => {
      if (running) return;
      state.current = null;
      save();
      renderConversation();
      $("app").classList.remove("sidebar-open");
      $("input").focus();
    });
    $("toggle-sidebar").addEventListener("click", () => $("app").classList.add("sidebar-open"));
    $("close-sidebar").addEventListener("click", () => $("app").classList.remove("sidebar-open"));
    $("forget-key").addEventListener("click", () => { localStorage.removeItem(KEY); setStatus("API key forgotten"); });
    renderConversation();
    loadModels();
  }

  window.phiforgeChat = { renderMarkdown }; // for tests: the renderer the page uses
  init();
})();
