// The qwenrun chat page: one file, no dependencies, talking to this server's own OpenAI routes.
// Everything a model or a user wrote reaches the DOM escaped (esc) or as textContent; the server's
// Content-Security-Policy is the second line: only this origin can be loaded or fetched.
"use strict";

const STORE = "qwenrun.chats.v1";       // conversations (localStorage: they survive a reload)
const SETTINGS = "qwenrun.settings.v1"; // thinking switch, budget, theme
const KEY = "qwenrun.apiKey";           // sessionStorage only: the key dies with the tab
const AGENT_PATH = "/v1/agent/chat/completions";

const $ = (id) => document.getElementById(id);
const ui = {
  log: $("log"), status: $("status"), error: $("error"), prompt: $("prompt"), form: $("composer"),
  thinking: $("thinking"), budget: $("budget"), budgetTokens: $("budget-tokens"),
  budgetValue: $("budget-value"), temperature: $("temperature"), send: $("send"), stop: $("stop"), agent: $("agent"),
  agentBox: $("agent-box"), modelName: $("model-name"), modelContext: $("model-context"),
  chatList: $("chat-list"), chats: $("chats"), chatsToggle: $("chats-toggle"),
  newChat: $("new-chat"), theme: $("theme"), keyDialog: $("key-dialog"), keyForm: $("key-form"),
  keyInput: $("key-input"), keyError: $("key-error"), attach: $("attach"), attachInput: $("attach-input"),
  pending: $("pending"),
};
// The server reads request bodies up to 16 MiB and base64 makes 4 bytes of 3: what one message may attach.
const MAX_ATTACH_BYTES = 11 << 20;

const state = {
  model: null, context: 0, agent: false, modalities: ["text"],
  pending: [], // attachments for the next message: {kind: "image" | "video", type, name, size, dataUrl}
  chats: load(localStorage, STORE, []),
  current: null,
  settings: Object.assign({thinking: true, budget: null, temperature: null, theme: null, agent: false},
                          load(localStorage, SETTINGS, {})),
  controller: null, // AbortController of the request in flight
};

function load(storage, key, fallback) {
  try { const v = JSON.parse(storage.getItem(key)); return v ?? fallback; } catch { return fallback; }
}
function saveChats() {
  try {
    localStorage.setItem(STORE, JSON.stringify(state.chats));
  } catch { // over the browser's quota (a few MB; attachments are data URLs): keep the text, drop the media
    localStorage.setItem(STORE, JSON.stringify(state.chats, (k, v) => (k === "dataUrl" ? undefined : v)));
  }
}
function saveSettings() { localStorage.setItem(SETTINGS, JSON.stringify(state.settings)); }

// ------------------------------------------------------------------------------- markdown

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

const KEYWORDS = new Set(("and as assert async await break case catch class const continue def del do elif else enum " +
  "except export extends false finally fn for from func function if impl import in interface is lambda let loop " +
  "match mod mut new nil none not null or pass pub raise return self static struct super switch this throw true " +
  "try type typeof use var void while with yield None True False").split(" "));
const CODE_TOKEN = /(\/\/[^\n]*|#[^\n]*|\/\*[\s\S]*?\*\/|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|`(?:\\.|[^`\\])*`|\b\d[\d_.]*(?:e[+-]?\d+)?\b|\b[A-Za-z_][A-Za-z0-9_]*\b)/g;

// A tiny highlighter: comments, strings, numbers and common keywords of C-like languages, Python and
// shell. Works on the raw code and escapes every piece, so it never emits the code's own markup.
function highlight(code, lang) {
  const hashComments = /^(py|python|sh|bash|shell|zsh|yaml|yml|toml|r|ruby|rb|perl)$/i.test(lang || "");
  let out = "", last = 0;
  for (const m of code.matchAll(CODE_TOKEN)) {
    const t = m[0];
    let cls = null;
    if (t.startsWith("//") || t.startsWith("/*")) cls = lang && hashComments ? null : "c";
    else if (t.startsWith("#")) cls = hashComments || !lang ? "c" : null;
    else if (/^["'`]/.test(t)) cls = "s";
    else if (/^\d/.test(t)) cls = "n";
    else if (KEYWORDS.has(t)) cls = "k";
    if (cls === null) continue;
    out += esc(code.slice(last, m.index)) + `<span class="tok-${cls}">${esc(t)}</span>`;
    last = m.index + t.length;
  }
  return out + esc(code.slice(last));
}

// Math is cut out of the markdown as its TeX source, escaped, in an element that `typeset` hands to
// KaTeX (vendored: /webui/vendor/katex). katex.render builds DOM nodes and sets their sizes through
// the CSSOM, which the page's CSP allows (inline style attributes it does not, so TeX KaTeX cannot
// parse is marked here, not by KaTeX's own error span, which colours itself with one).
function mathSpan(src, display) {
  const t = src.trim();
  return `<span class="math${display ? " display" : ""}" data-tex="${esc(t)}">${esc(t)}</span>`;
}

function typeset(root) {
  if (!window.katex) return; // not loaded: the TeX source stays readable as text
  for (const node of root.querySelectorAll(".math[data-tex]")) {
    const src = node.dataset.tex;
    node.removeAttribute("data-tex");
    try {
      katex.render(src, node, {displayMode: node.classList.contains("display"), throwOnError: true});
      // a few constructs (\vec's arrow, \fcolorbox's border) come with a style attribute, which the
      // CSP refuses (and reports); the same declarations set through the CSSOM are allowed
      for (const styled of node.querySelectorAll("[style]")) styled.style.cssText = styled.getAttribute("style");
    } catch (e) {
      node.classList.add("math-error");
      node.title = e.message;
      node.textContent = src;
    }
  }
}

// Inline markdown of one escaped-later text run: code spans and math are cut out first (their
// content is literal), then bold, italic and links on the escaped rest.
function inline(text) {
  const parts = [];
  const re = /(`+)([\s\S]*?[^`])\1(?!`)|\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\]|\\\(([\s\S]+?)\\\)|\$([^\s$](?:[^$\n]*[^\s$])?)\$(?!\d)/g;
  let last = 0;
  for (const m of text.matchAll(re)) {
    parts.push(decorate(esc(text.slice(last, m.index))));
    if (m[1]) parts.push(`<code>${esc(m[2].trim())}</code>`);
    else if (m[3] ?? m[4]) parts.push(mathSpan(m[3] ?? m[4], true));
    else parts.push(mathSpan(m[5] ?? m[6], false));
    last = m.index + m[0].length;
  }
  parts.push(decorate(esc(text.slice(last))));
  return parts.join("");
}

function decorate(h) {
  return h
    .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, (_, label, url) =>
      `<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`)
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*([^*\s][^*]*?)\*(?!\w)/g, "$1<em>$2</em>")
    .replace(/(^|\W)_([^_\s][^_]*?)_(?!\w)/g, "$1<em>$2</em>");
}

// A markdown subset: fenced code, $$ display math, headings, lists, quotes, rules, paragraphs.
function markdown(src) {
  const lines = String(src).replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let para = [], list = null;
  const flushPara = () => { if (para.length) out.push(`<p>${inline(para.join("\n")).replace(/\n/g, "<br>")}</p>`); para = []; };
  const flushList = () => { if (list) out.push(`<${list.tag}>${list.items.map((i) => `<li>${inline(i)}</li>`).join("")}</${list.tag}>`); list = null; };
  const flush = () => { flushPara(); flushList(); };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    let m;
    if ((m = line.match(/^\s*(```+|~~~+)\s*([\w+#.-]*)/))) {
      flush();
      const fence = m[1], lang = m[2];
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence); i++) body.push(lines[i]);
      const code = body.join("\n");
      out.push(`<div class="code"><div class="code-bar"><span>${esc(lang || "text")}</span>` +
               `<button type="button" class="copy-code">Copy code</button></div>` +
               `<pre><code>${highlight(code, lang)}</code></pre></div>`);
    } else if (/^\s*(\$\$|\\\[)\s*$/.test(line)) {
      flush();
      const close = line.trim() === "$$" ? "$$" : "\\]";
      const body = [];
      for (i++; i < lines.length && lines[i].trim() !== close; i++) body.push(lines[i]);
      out.push(mathSpan(body.join("\n"), true));
    } else if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
      flush();
      const level = Math.min(6, m[1].length + 2); // h1/h2 belong to the page
      out.push(`<h${level}>${inline(m[2])}</h${level}>`);
    } else if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      flush(); out.push("<hr>");
    } else if ((m = line.match(/^\s*>\s?(.*)$/))) {
      flush(); out.push(`<blockquote>${inline(m[1])}</blockquote>`);
    } else if ((m = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/))) {
      flushPara();
      const tag = /\d/.test(m[1]) ? "ol" : "ul";
      if (!list || list.tag !== tag) { flushList(); list = {tag, items: []}; }
      list.items.push(m[2]);
    } else if (!line.trim()) {
      flush();
    } else if (list && /^\s{2,}/.test(line)) {
      list.items[list.items.length - 1] += " " + line.trim();
    } else {
      flushList(); para.push(line);
    }
  }
  flush();
  return out.join("");
}

// ------------------------------------------------------------------------------- server

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

class NeedKey extends Error {}

async function api(path, init = {}) {
  const r = await fetch(path, {...init, headers: headers()});
  if (r.status === 401) throw new NeedKey((await errorText(r)) || "API key required");
  if (!r.ok) throw new Error(`${r.status}: ${(await errorText(r)) || r.statusText}`);
  return r;
}

async function errorText(r) {
  try { const j = await r.json(); return j.error?.message ?? JSON.stringify(j); } catch { return ""; }
}

// Resolves once a key the server accepts is stored (the dialog stays up until then).
let keyWaiter = null;
function askKey(message) {
  if (!keyWaiter) {
    keyWaiter = new Promise((resolve) => {
      ui.keyError.hidden = !message || !sessionStorage.getItem(KEY);
      ui.keyError.textContent = message || "";
      ui.keyForm.onsubmit = async (ev) => {
        ev.preventDefault();
        sessionStorage.setItem(KEY, ui.keyInput.value.trim());
        try {
          await api("/v1/models");
        } catch (e) {
          ui.keyError.hidden = false;
          ui.keyError.textContent = e instanceof NeedKey ? "That key was refused." : e.message;
          ui.keyInput.select();
          return;
        }
        ui.keyDialog.close();
        keyWaiter = null;
        resolve();
      };
      ui.keyDialog.addEventListener("cancel", (ev) => ev.preventDefault()); // no key, no page
      ui.keyDialog.showModal();
      ui.keyInput.focus();
    });
  }
  return keyWaiter;
}

async function withKey(fn) {
  for (;;) {
    try { return await fn(); } catch (e) { if (!(e instanceof NeedKey)) throw e; await askKey(e.message); }
  }
}

async function loadModel() {
  const r = await withKey(() => api("/v1/models"));
  const card = (await r.json()).data[0];
  state.model = card.id;
  state.context = card.max_model_len || 0;
  ui.modelName.textContent = card.id;
  ui.modelContext.textContent = state.context ? `context ${state.context.toLocaleString("en")} tokens` : "";
  state.modalities = card.input_modalities || ["text"];
  const media = ["image", "video"].filter((k) => state.modalities.includes(k));
  ui.attach.hidden = !media.length;
  ui.attach.setAttribute("aria-label", `Attach ${media.join(" or ")} (or drop or paste one into the message box)`);
  ui.attachInput.accept = media.map((k) => `${k}/*`).join(",");
  document.title = `${card.id} · qwenrun`;
  setupBudget();
  try { // the agent route exists only with `serve --mcp-config`; the schema lists it then
    const doc = await (await fetch("/openapi.json")).json();
    state.agent = AGENT_PATH in (doc.paths || {});
  } catch { state.agent = false; }
  ui.agentBox.hidden = !state.agent;
  ui.agent.checked = state.agent && state.settings.agent;
}

// ------------------------------------------------------------------------------- budget

// Slider stops: no limit, then 256, 512, ... doubling up to the model's context. The number box
// takes any budget (the bundled model's traces are 45-150 tokens, so 16 or 64 is worth trying).
function budgetStops() {
  const stops = [null];
  for (let b = 256; b < state.context; b *= 2) stops.push(b);
  if (state.context) stops.push(state.context);
  return stops;
}

function setupBudget() {
  const stops = budgetStops();
  ui.budget.max = String(stops.length - 1);
  showBudget(state.settings.budget);
}

function showBudget(budget) {
  const stops = budgetStops();
  let pos = 0;
  if (budget !== null) {
    const above = stops.findIndex((s) => s !== null && s >= budget);
    pos = above < 0 ? stops.length - 1 : above;
  }
  ui.budget.value = String(pos);
  ui.budgetTokens.value = budget === null ? "" : String(budget);
  const text = budget === null ? "no limit" : `${budget.toLocaleString("en")} tokens`;
  ui.budgetValue.textContent = text;
  ui.budget.setAttribute("aria-valuetext", text);
  const off = !ui.thinking.checked;
  ui.budget.disabled = off; ui.budgetTokens.disabled = off;
}

function setBudget(budget) {
  state.settings.budget = budget;
  saveSettings();
  showBudget(budget);
}

// ------------------------------------------------------------------------------- conversations

function newId() { return Date.now().toString(36) + Math.random().toString(36).slice(2, 8); }

function chat() {
  return state.chats.find((c) => c.id === state.current) || null;
}

function startChat() {
  const c = {id: newId(), title: "New chat", messages: [], updated: Date.now()};
  state.chats.unshift(c);
  state.current = c.id;
  localStorage.setItem(STORE + ".current", c.id);
  saveChats();
  return c;
}

function selectChat(id) {
  if (state.controller) stop();
  state.current = id;
  localStorage.setItem(STORE + ".current", id);
  renderAll();
  closeChatsOnPhone();
}

function renderChatList() {
  ui.chatList.replaceChildren();
  for (const c of state.chats) {
    const li = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "chat-open";
    open.textContent = c.title;
    if (c.id === state.current) open.setAttribute("aria-current", "true");
    open.onclick = () => selectChat(c.id);
    const del = document.createElement("button");
    del.type = "button";
    del.className = "icon chat-delete";
    del.textContent = "×";
    del.setAttribute("aria-label", `Delete chat: ${c.title}`);
    del.onclick = () => {
      state.chats = state.chats.filter((x) => x.id !== c.id);
      if (state.current === c.id) state.current = state.chats[0]?.id ?? null;
      saveChats();
      renderAll();
    };
    li.append(open, del);
    ui.chatList.append(li);
  }
}

function closeChatsOnPhone() {
  document.body.classList.remove("chats-open");
  ui.chatsToggle.setAttribute("aria-expanded", "false");
}

// ------------------------------------------------------------------------------- rendering

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function button(label, onclick, aria) {
  const b = el("button", "small", label);
  b.type = "button";
  b.onclick = onclick;
  if (aria) b.setAttribute("aria-label", aria);
  return b;
}

function renderAll() {
  renderChatList();
  ui.log.replaceChildren();
  const c = chat();
  if (!c || !c.messages.length) {
    ui.log.append(el("p", "empty muted", state.model === "qwen3-tiny-thinker"
      ? "The bundled demo model does arithmetic: try “What is 347 * 86?”, with thinking on and off."
      : "Start a conversation below."));
    return;
  }
  c.messages.forEach((m, i) => ui.log.append(renderMessage(c, m, i)));
  ui.log.scrollTop = ui.log.scrollHeight;
}

function renderMessage(c, m, index) {
  const article = el("article", `msg ${m.role}`);
  article.dataset.index = String(index);
  article.setAttribute("aria-label", m.role === "user" ? "You" : "Assistant");
  article.append(el("div", "who", m.role === "user" ? "You" : (m.meta?.model || "Assistant")));
  if (m.role === "user") {
    if (m.attachments?.length) article.append(attachmentList(m.attachments));
    const body = el("div", "body");
    body.innerHTML = markdown(m.content);
    typeset(body);
    article.append(body, actions([
      button("Edit", () => editMessage(article, c, index), "Edit this message"),
      button("Copy", (ev) => copy(ev.target, m.content), "Copy this message"),
    ]));
    return article;
  }
  const meta = m.meta || {};
  article.append(el("div", "mode muted", modeText(meta)));
  for (const step of m.steps || []) article.append(renderStep(step));
  if (m.reasoning || meta.streaming === "reasoning") article.append(renderReasoning(m));
  for (const call of m.toolCalls || []) article.append(renderToolCall(call));
  const answer = el("div", "body answer");
  answer.innerHTML = markdown(m.content || "");
  typeset(answer);
  if (m.error) answer.append(el("p", "error", m.error));
  article.append(answer);
  const stats = el("div", "stats muted", statsText(meta));
  const last = index === c.messages.length - 1;
  const buttons = [button("Copy", (ev) => copy(ev.target, m.content || ""), "Copy this answer")];
  if (last) buttons.push(button("Regenerate", () => regenerate(), "Regenerate this answer"));
  article.append(stats, actions(buttons));
  if (meta.streaming) {
    answer.setAttribute("aria-busy", "true");
    article.querySelector(".actions").hidden = true;
  }
  return article;
}

function actions(buttons) {
  const d = el("div", "actions");
  d.append(...buttons);
  return d;
}

function modeText(meta) {
  let text = !meta.thinking ? "thinking off"
    : meta.budget == null ? "thinking · no budget" : `thinking · budget ${meta.budget} tokens`;
  if (meta.agent) text = `server tools · ${text}`;
  return meta.temperature == null ? text : `${text} · temperature ${meta.temperature}`;
}

function statsText(meta) {
  if (meta.streaming) return meta.streaming === "reasoning" ? "thinking…" : "answering…";
  const parts = [];
  if (meta.ttft != null) parts.push(`TTFT ${meta.ttft.toFixed(2)} s`);
  if (meta.tps != null) parts.push(`${meta.tps.toFixed(1)} tokens/s`);
  if (meta.tokens != null) parts.push(`${meta.tokens} tokens`);
  if (meta.finish) parts.push(meta.finish === "stop" ? "done" : meta.finish);
  return parts.join(" · ");
}

function renderReasoning(m) {
  const meta = m.meta || {};
  const d = el("details", "reasoning");
  d.open = meta.streaming === "reasoning" || !!m.reasoningOpen;
  let label = meta.streaming === "reasoning" ? "Thinking…" : "Thought";
  if (meta.reasoningTokens != null) label += ` · ${meta.reasoningTokens} tokens`; // unknown from the agent route
  if (meta.reasoningSeconds != null) label += ` · ${meta.reasoningSeconds.toFixed(1)} s`;
  if (meta.budgetReached) label += " · stopped at the budget";
  const summary = el("summary", null, label);
  summary.onclick = () => { m.reasoningOpen = !d.open; }; // a user's choice, not the streaming default
  const body = el("div", "reasoning-body");
  body.textContent = m.reasoning || "";
  d.append(summary, body);
  return d;
}

function renderToolCall(call) {
  const d = el("div", "tool-call");
  d.append(el("div", "tool-title", `Tool call · ${call.name || "…"}`));
  d.append(el("pre", null, prettyJson(call.arguments || "")));
  return d;
}

function renderStep(step) {
  if (step.role === "tool") {
    const d = el("div", `tool-result${step.isError ? " is-error" : ""}`);
    d.append(el("div", "tool-title", `Tool result · ${step.name || ""}${step.isError ? " (error)" : ""}`));
    d.append(el("pre", null, step.content || ""));
    return d;
  }
  return renderToolCall(step);
}

function prettyJson(s) {
  try { return JSON.stringify(JSON.parse(s), null, 2); } catch { return s; }
}

async function copy(target, text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const t = el("textarea");
    t.value = text;
    document.body.append(t);
    t.select();
    document.execCommand("copy");
    t.remove();
  }
  const old = target.textContent;
  target.textContent = "Copied";
  setTimeout(() => { target.textContent = old; }, 1200);
}

function editMessage(article, c, index) {
  if (state.controller) return;
  const body = article.querySelector(".body");
  const box = el("textarea", "edit-box");
  box.value = c.messages[index].content;
  box.setAttribute("aria-label", "Edit message");
  const save = button("Save and send", () => {
    const text = box.value.trim();
    const old = c.messages[index];
    if (!text && !old.attachments?.length) return;
    c.messages = c.messages.slice(0, index);
    c.messages.push({...old, content: text});
    saveChats();
    renderAll();
    generate(c);
  });
  const cancel = button("Cancel", () => renderAll());
  box.onkeydown = (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); save.click(); }
    if (ev.key === "Escape") { ev.preventDefault(); ev.stopPropagation(); cancel.click(); }
  };
  body.replaceWith(box);
  article.querySelector(".actions").replaceChildren(save, cancel);
  box.focus();
}

// ------------------------------------------------------------------------------- attachments

// A message with attachments goes out as OpenAI content parts, the media first (Qwen's own order),
// each as the data: URL it was read into; the server decodes and checks them (qwenrun/multimodal).
function contentParts(m) {
  const media = (m.attachments || []).filter((a) => a.dataUrl);
  if (!media.length) return m.content || "";
  return [...media.map((a) => a.kind === "video" ? {type: "video_url", video_url: {url: a.dataUrl}}
                                                 : {type: "image_url", image_url: {url: a.dataUrl}}),
          {type: "text", text: m.content || ""}];
}

function attachmentList(items, removable = false) {
  const list = el("ul", "attachments");
  list.setAttribute("aria-label", "Attachments");
  items.forEach((a, i) => {
    const li = el("li");
    if (!a.dataUrl) {
      li.append(el("span", "missing", `${a.kind} ${a.name} (not kept: browser storage full)`));
    } else if (a.kind === "video") {
      const v = el("video");
      v.src = a.dataUrl;
      v.muted = true;
      v.preload = "metadata";
      v.controls = !removable;
      v.setAttribute("aria-label", `Video: ${a.name}`);
      li.append(v);
    } else {
      const img = el("img");
      img.src = a.dataUrl;
      img.alt = `Image: ${a.name}`;
      li.append(img);
    }
    if (removable) {
      const x = button("×", () => { state.pending.splice(i, 1); renderPending(); ui.prompt.focus(); },
                       `Remove ${a.kind}: ${a.name}`);
      x.classList.add("remove");
      li.append(x);
    }
    list.append(li);
  });
  return list;
}

function renderPending() {
  ui.pending.replaceChildren(...attachmentList(state.pending, true).childNodes);
  ui.pending.hidden = !state.pending.length;
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

// From the file picker, a drop or a paste; what the model cannot take, or what would not fit in
// one request, is refused with a message instead of failing at the server.
async function addFiles(files) {
  showError("");
  for (const f of files) {
    const kind = ["image", "video"].find((k) => f.type.startsWith(`${k}/`));
    if (!kind || !state.modalities.includes(kind)) {
      showError(`${f.name || "That file"}: this model takes ${state.modalities.filter((k) => k !== "text").join(" and ") || "text only"}.`);
      continue;
    }
    const used = state.pending.reduce((n, a) => n + a.size, 0);
    if (used + f.size > MAX_ATTACH_BYTES) {
      showError(`${f.name}: attachments of one message are limited to ${MAX_ATTACH_BYTES >> 20} MiB.`);
      continue;
    }
    state.pending.push({kind, type: f.type, name: f.name || kind, size: f.size, dataUrl: await readDataUrl(f)});
  }
  renderPending();
}

const hasFiles = (ev) => !ui.attach.hidden && [...(ev.dataTransfer?.types || [])].includes("Files");

// ------------------------------------------------------------------------------- generation

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.log.setAttribute("aria-busy", busy ? "true" : "false");
}

function announce(text) { ui.status.textContent = text; }

function showError(text) {
  ui.error.hidden = !text;
  ui.error.textContent = text || "";
}

function send() {
  const text = ui.prompt.value.trim();
  if ((!text && !state.pending.length) || state.controller) return;
  const c = chat() || startChat();
  const m = {role: "user", content: text};
  if (state.pending.length) m.attachments = state.pending.splice(0);
  c.messages.push(m);
  const title = text || m.attachments.map((a) => a.name).join(", ");
  if (c.title === "New chat") c.title = title.length > 48 ? title.slice(0, 47) + "…" : title;
  ui.prompt.value = "";
  renderPending();
  saveChats();
  renderAll();
  generate(c);
}

function regenerate() {
  const c = chat();
  if (!c || state.controller) return;
  while (c.messages.length && c.messages[c.messages.length - 1].role !== "user") c.messages.pop();
  if (!c.messages.length) return;
  saveChats();
  renderAll();
  generate(c);
}

function stop() {
  if (state.controller) state.controller.abort();
}

function requestBody(c, meta) {
  const body = {
    model: state.model,
    messages: c.messages.map((m) => ({role: m.role, content: contentParts(m)})),
    chat_template_kwargs: {enable_thinking: meta.thinking},
  };
  if (meta.thinking && meta.budget != null) body.thinking_budget = meta.budget;
  if (meta.temperature != null) body.temperature = meta.temperature;
  return body;
}

async function generate(c) {
  showError("");
  const meta = {
    thinking: ui.thinking.checked, budget: ui.thinking.checked ? state.settings.budget : null,
    temperature: state.settings.temperature, agent: state.agent && ui.agent.checked, model: state.model, streaming: "reasoning",
    reasoningTokens: 0,
  };
  const body = requestBody(c, meta);
  const m = {role: "assistant", content: "", reasoning: "", toolCalls: [], meta};
  c.messages.push(m);
  c.updated = Date.now();
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  announce("Generating…");
  const article = () => ui.log.querySelector(`article[data-index="${c.messages.indexOf(m)}"]`);
  let frame = 0;
  const redraw = () => {
    if (frame || chat() !== c) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      const old = article();
      if (!old) return;
      old.replaceWith(renderMessage(c, m, c.messages.indexOf(m)));
      ui.log.scrollTop = ui.log.scrollHeight;
    });
  };
  renderAll();
  const t0 = performance.now();
  let first = null, firstContent = null;
  try {
    if (meta.agent) {
      await runAgent(body, m, controller);
      first = performance.now();
    } else {
      await withKey(async () => {
        const r = await api("/v1/chat/completions", {
          method: "POST", signal: controller.signal,
          body: JSON.stringify({...body, stream: true, stream_options: {include_usage: true}}),
        });
        for await (const event of sse(r.body)) {
          if (event.error) throw new Error(event.error.message || JSON.stringify(event.error));
          if (event.usage) {
            meta.tokens = event.usage.completion_tokens;
            meta.reasoningTokens = event.usage.completion_tokens_details?.reasoning_tokens ?? meta.reasoningTokens;
          }
          const choice = event.choices?.[0];
          if (!choice) continue;
          const d = choice.delta || {};
          const now = performance.now();
          if (d.reasoning_content) {
            first ??= now;
            m.reasoning += d.reasoning_content;
            meta.reasoningTokens += 1; // one event per decode step; usage gives the exact count
          }
          if (d.content || d.tool_calls) {
            first ??= now;
            if (firstContent === null) {
              firstContent = now;
              if (m.reasoning) meta.reasoningSeconds = (now - first) / 1000;
              meta.streaming = "answer";
            }
            if (d.content) m.content += d.content;
            for (const tc of d.tool_calls || []) {
              const call = (m.toolCalls[tc.index] ??= {name: "", arguments: ""});
              if (tc.function?.name) call.name += tc.function.name;
              if (tc.function?.arguments) call.arguments += tc.function.arguments;
            }
          }
          if (choice.finish_reason) meta.finish = choice.finish_reason;
          redraw();
        }
      });
    }
  } catch (e) {
    if (controller.signal.aborted) meta.finish = "stopped";
    else { m.error = e.message; meta.finish = "error"; }
  }
  const end = performance.now();
  if (first !== null) {
    meta.ttft = (first - t0) / 1000;
    if (m.reasoning && meta.reasoningSeconds == null && !meta.agent) meta.reasoningSeconds = ((firstContent ?? end) - first) / 1000;
    const tokens = meta.tokens ?? (meta.reasoningTokens + (m.content ? 1 : 0));
    if (end > first && tokens > 1) meta.tps = (tokens - 1) / ((end - first) / 1000);
  }
  meta.budgetReached = meta.thinking && meta.budget != null && meta.reasoningTokens >= meta.budget;
  delete meta.streaming;
  if (!m.toolCalls.length) delete m.toolCalls;
  state.controller = null;
  if (frame) { cancelAnimationFrame(frame); frame = 0; }
  saveChats();
  setBusy(false);
  if (chat() === c) renderAll();
  // the log itself is not live (a token at a time would swamp a screen reader): the answer is read once
  const said = (m.content || "").slice(0, 600);
  announce(meta.finish === "stopped" ? `Stopped. ${said}` : meta.finish === "error" ? `Failed: ${m.error}` : `Answer: ${said}`);
  ui.prompt.focus();
}

// The agent route runs the server's MCP tools and answers once (no stream): its steps become
// tool-call and tool-result blocks above the answer. Stop only drops the answer here; the server
// finishes the run (bounded by its max_steps), as the route documents.
async function runAgent(body, m, controller) {
  const r = await withKey(() => api(AGENT_PATH, {method: "POST", signal: controller.signal, body: JSON.stringify(body)}));
  const data = await r.json();
  const message = data.choices[0].message;
  m.steps = [];
  const results = data.qwenrun_agent?.tool_results || [];
  for (const step of data.qwenrun_agent?.messages || []) {
    if (step.role === "assistant") {
      for (const tc of step.tool_calls || []) m.steps.push({name: tc.function?.name, arguments: tc.function?.arguments});
    } else if (step.role === "tool") {
      const res = results.find((x) => x.tool_call_id === step.tool_call_id);
      m.steps.push({role: "tool", name: res?.name ?? step.name, content: step.content, isError: !!res?.is_error});
    }
  }
  m.content = message.content || "";
  m.reasoning = message.reasoning_content || "";
  m.meta.reasoningTokens = null;
  m.meta.tokens = data.usage?.completion_tokens;
  m.meta.finish = data.choices[0].finish_reason;
}

// Server-sent events of a fetch body: yields each `data:` JSON object until `[DONE]`.
async function* sse(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// ------------------------------------------------------------------------------- theme and events

function applyTheme() {
  const dark = state.settings.theme ? state.settings.theme === "dark"
    : matchMedia("(prefers-color-scheme: dark)").matches;
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  ui.theme.textContent = dark ? "Light" : "Dark";
  ui.theme.setAttribute("aria-label", dark ? "Switch to the light theme" : "Switch to the dark theme");
  ui.theme.setAttribute("aria-pressed", String(dark));
}

function wire() {
  ui.form.addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
  ui.prompt.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); send(); }
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && state.controller && !ui.keyDialog.open) { ev.preventDefault(); stop(); }
  });
  ui.stop.onclick = stop;
  ui.attach.onclick = () => ui.attachInput.click();
  ui.attachInput.onchange = () => { addFiles([...ui.attachInput.files]); ui.attachInput.value = ""; };
  ui.form.addEventListener("dragover", (ev) => {
    if (!hasFiles(ev)) return;
    ev.preventDefault();
    ui.form.classList.add("dropping");
  });
  ui.form.addEventListener("dragleave", () => ui.form.classList.remove("dropping"));
  ui.form.addEventListener("drop", (ev) => {
    ui.form.classList.remove("dropping");
    if (!hasFiles(ev)) return;
    ev.preventDefault();
    addFiles([...ev.dataTransfer.files]);
  });
  ui.prompt.addEventListener("paste", (ev) => {
    const files = [...(ev.clipboardData?.files || [])];
    if (ui.attach.hidden || !files.length) return;
    ev.preventDefault();
    addFiles(files);
  });
  ui.newChat.onclick = () => { if (state.controller) stop(); startChat(); renderAll(); ui.prompt.focus(); };
  ui.thinking.onchange = () => { state.settings.thinking = ui.thinking.checked; saveSettings(); showBudget(state.settings.budget); };
  ui.budget.oninput = () => setBudget(budgetStops()[Number(ui.budget.value)] ?? null);
  ui.budgetTokens.onchange = () => {
    const v = ui.budgetTokens.value.trim();
    const n = Math.floor(Number(v));
    setBudget(v === "" || !Number.isFinite(n) || n < 0 ? null : n);
  };
  ui.temperature.onchange = () => {
    const v = ui.temperature.value.trim(), t = Number(v);
    state.settings.temperature = v === "" || !Number.isFinite(t) || t < 0 ? null : t;
    ui.temperature.value = state.settings.temperature ?? "";
    saveSettings();
  };
  ui.agent.onchange = () => { state.settings.agent = ui.agent.checked; saveSettings(); };
  ui.theme.onclick = () => {
    state.settings.theme = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    saveSettings();
    applyTheme();
  };
  ui.chatsToggle.onclick = () => {
    const open = document.body.classList.toggle("chats-open");
    ui.chatsToggle.setAttribute("aria-expanded", String(open));
  };
  ui.log.addEventListener("click", (ev) => {
    const b = ev.target.closest(".copy-code");
    if (b) copy(b, b.closest(".code").querySelector("code").textContent);
  });
}

async function main() {
  applyTheme();
  ui.thinking.checked = state.settings.thinking;
  ui.temperature.value = state.settings.temperature ?? "";
  wire();
  const saved = localStorage.getItem(STORE + ".current");
  state.current = state.chats.some((c) => c.id === saved) ? saved : state.chats[0]?.id ?? null;
  // a reload mid-answer leaves a half answer: keep it, marked as cut off
  for (const c of state.chats) for (const m of c.messages) if (m.meta?.streaming) { delete m.meta.streaming; m.meta.finish = "interrupted"; }
  renderAll();
  try {
    await loadModel();
  } catch (e) {
    showError(`Could not reach the model: ${e.message}`);
  }
  renderAll();
  ui.prompt.focus();
}

main();
