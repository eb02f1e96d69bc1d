// The chat playground: conversations (kept in localStorage), streaming replies, Stop / regenerate / edit.
import { getJSON, streamChat } from './api.js';
import { hasAttachments, initAttach, setImagesEnabled, takeAttachments } from './attach.js';
import { copyButton, mergeToolCallDeltas, renderMarkdown, renderReasoning, renderToolCalls } from './render.js';
import * as store from './store.js';

const $ = (id) => document.getElementById(id);
const MODEL_STORE = 'lmserve.model';

let conversations = [];
let current = null;        // the conversation shown
let controller = null;     // AbortController of the reply streaming now, if any
let takesImages = new Set();   // models whose /v1/models card lists image input

export function showError(text) {
  const el = $('error');
  el.textContent = text ?? '';
  el.hidden = !text;
}

function save() {
  store.saveConversations(conversations, current?.id);
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function button(label, onClick, extra = {}) {
  const b = el('button', extra.className, label);
  b.type = 'button';
  if (extra.ariaLabel) b.setAttribute('aria-label', extra.ariaLabel);
  b.addEventListener('click', onClick);
  return b;
}

// ---- settings -> request body ---------------------------------------------------------------------------
function readSettings() {
  const s = { system: $('system').value };
  for (const input of document.querySelectorAll('[data-setting]')) s[input.dataset.setting] = input.value;
  return s;
}

function requestBody(messages) {
  const s = readSettings();
  const body = { model: $('model').value, messages: [], stream: true, stream_options: { include_usage: true } };
  if (s.system.trim()) body.messages.push({ role: 'system', content: s.system });
  for (const m of messages) {
    // NOTE: replies that failed before any text are shown, not sent back to the model.
    if (m.role === 'assistant' && !m.content && !m.tool_calls?.length) continue;
    const msg = { role: m.role, content: m.content };
    if (m.images?.length) {     // images first, then the text: the order LLaVA-style prompts are trained on
      msg.content = [...m.images.map((url) => ({ type: 'image_url', image_url: { url } })),
        ...(m.content ? [{ type: 'text', text: m.content }] : [])];
    }
    if (m.tool_calls?.length) msg.tool_calls = m.tool_calls;
    body.messages.push(msg);
  }
  for (const [key, raw] of Object.entries(s)) {
    if (key === 'system' || String(raw).trim() === '') continue;
    if (key === 'stop') {
      const stops = raw.split('\n').filter((x) => x !== '');
      if (stops.length) body.stop = stops;
    } else {
      body[key] = Number(raw);
    }
  }
  return body;
}

// ---- rendering ------------------------------------------------------------------------------------------
function statsText(msg) {
  const st = msg.stats ?? {};
  const parts = [];
  if (msg.stopped) parts.push('stopped');
  if (st.completion_tokens !== undefined) parts.push(`${st.completion_tokens} tokens`);
  else if (st.num_chunks) parts.push(`≈${st.num_chunks} tokens`);
  if (st.prompt_tokens !== undefined) parts.push(`prompt ${st.prompt_tokens}`);
  if (st.tok_per_s) parts.push(`${st.tok_per_s.toFixed(1)} tok/s`);
  if (st.ttft_s !== undefined) parts.push(`TTFT ${st.ttft_s.toFixed(2)} s`);
  if (msg.finish_reason) parts.push(`finish: ${msg.finish_reason}`);
  return parts.join(' · ');
}

function fillAssistant(node, msg, isStreaming) {
  const content = node.querySelector('.content');
  renderMarkdown(content, msg.content);
  renderReasoning(content, msg.reasoning, isStreaming);
  renderToolCalls(content, msg.tool_calls);
  node.querySelector('.stats').textContent = statsText(msg);
  const err = node.querySelector('.msg-error');
  err.textContent = msg.error ?? '';
  err.hidden = !msg.error;
}

function messageNode(msg, index) {
  const isLast = index === current.messages.length - 1;
  const node = el('div', `msg ${msg.role}`);
  node.dataset.role = msg.role;
  node.append(el('div', 'role', msg.role === 'user' ? 'You' : 'Assistant'));
  const actions = el('div', 'actions');
  if (msg.role === 'user') {
    if (msg.images?.length) {
      const images = el('div', 'images');
      images.append(...msg.images.map((url, i) => Object.assign(el('img'), { src: url, alt: `image ${i + 1}` })));
      node.append(images);
    }
    node.append(el('div', 'text', msg.content));
    actions.append(button('Edit', () => startEdit(node, index), { className: 'edit-btn' }));
    actions.append(copyButton(() => msg.content));
  } else {
    node.append(el('div', 'content'), el('div', 'msg-error'));
    actions.append(el('span', 'stats'), copyButton(() => msg.content));
    if (isLast && !controller) actions.append(button('Regenerate', regenerate, { className: 'regenerate' }));
  }
  node.append(actions);
  if (msg.role === 'assistant') fillAssistant(node, msg, false);
  return node;
}

function renderList() {
  const ul = $('conversations');
  ul.replaceChildren();
  for (const c of [...conversations].sort((a, b) => b.updated - a.updated)) {
    const li = el('li');
    if (c === current) li.setAttribute('aria-current', 'true');
    li.append(button(c.title, () => switchTo(c), { className: 'open' }),
      button('×', () => remove(c), { className: 'delete', ariaLabel: `Delete conversation ${c.title}` }));
    ul.append(li);
  }
}

function render() {
  const box = $('messages');
  box.replaceChildren(...current.messages.map(messageNode));
  box.scrollTop = box.scrollHeight;
  renderList();
  box.setAttribute('aria-busy', String(!!controller));
  $('send').hidden = !!controller;
  $('stop').hidden = !controller;
}

// ---- actions --------------------------------------------------------------------------------------------
function switchTo(c) {
  if (controller) return;
  current = c;
  save();
  render();
}

function remove(c) {
  if (controller && c === current) return;
  conversations = conversations.filter((x) => x !== c);
  if (c === current) current = conversations[0] ?? addConversation();
  save();
  render();
}

function addConversation() {
  const c = store.newConversation();
  conversations.push(c);
  return c;
}

function startEdit(node, index) {
  if (controller) return;
  const text = node.querySelector('.text');
  const area = el('textarea', 'edit');
  area.value = current.messages[index].content;
  const images = current.messages[index].images ?? [];   // an edited message keeps its images
  area.rows = Math.min(10, area.value.split('\n').length + 1);
  area.setAttribute('aria-label', 'Edit message');
  const actions = node.querySelector('.actions');
  actions.replaceChildren(
    button('Send', () => { current.messages = current.messages.slice(0, index); send(area.value, images); },
      { className: 'primary' }),
    button('Cancel', render));
  area.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      current.messages = current.messages.slice(0, index);
      send(area.value, images);
    }
  });
  text.replaceWith(area);
  area.focus();
}

export function send(text, keptImages = []) {
  if (controller || (!text.trim() && !hasAttachments() && !keptImages.length)) return;
  showError('');
  if (!current.messages.length) current.title = text.trim().slice(0, 48) || 'Image';
  const images = [...keptImages, ...takeAttachments()];
  current.messages.push(images.length ? { role: 'user', content: text, images } : { role: 'user', content: text });
  generate();
}

function regenerate() {
  if (controller) return;
  const last = current.messages.at(-1);
  if (last?.role === 'assistant') current.messages.pop();
  generate();
}

export function stop() {
  controller?.abort();
}

async function generate() {
  const conv = current;
  const body = requestBody(conv.messages);
  const msg = { role: 'assistant', content: '', stats: { num_chunks: 0 } };
  conv.messages.push(msg);
  conv.updated = Date.now();
  controller = new AbortController();
  render();
  const node = $('messages').lastElementChild;
  const started = performance.now();
  let firstAt = null;
  let lastAt = null;
  let pending = false;
  const repaint = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      if (node.isConnected) fillAssistant(node, msg, true);
      const box = $('messages');
      box.scrollTop = box.scrollHeight;
    });
  };
  try {
    for await (const chunk of streamChat(body, controller.signal)) {
      if (chunk.usage) {
        msg.stats.prompt_tokens = chunk.usage.prompt_tokens;
        msg.stats.completion_tokens = chunk.usage.completion_tokens;
      }
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      const delta = choice.delta ?? {};
      const got = delta.content || delta.reasoning_content || delta.tool_calls?.length;
      if (got) {
        lastAt = performance.now();
        firstAt ??= lastAt;
        msg.stats.num_chunks += 1;
      }
      if (delta.content) msg.content += delta.content;
      if (delta.reasoning_content) msg.reasoning = (msg.reasoning ?? '') + delta.reasoning_content;
      if (delta.tool_calls?.length) msg.tool_calls = mergeToolCallDeltas(msg.tool_calls ?? [], delta.tool_calls);
      if (choice.finish_reason) msg.finish_reason = choice.finish_reason;
      repaint();
    }
  } catch (e) {
    if (e.name === 'AbortError') {
      msg.stopped = true;
    } else {
      msg.error = e.message;
      showError(e.message);
    }
  } finally {
    if (firstAt !== null) {
      msg.stats.ttft_s = (firstAt - started) / 1000;
      const n = (msg.stats.completion_tokens ?? msg.stats.num_chunks) - 1;
      if (n > 0 && lastAt > firstAt) msg.stats.tok_per_s = n / ((lastAt - firstAt) / 1000);
    }
    controller = null;
    conv.updated = Date.now();
    save();
    if (conv === current) render();
    $('prompt').focus();
  }
}

// ---- models ---------------------------------------------------------------------------------------------
export async function loadModels() {
  const select = $('model');
  try {
    const cards = (await getJSON('v1/models')).data;
    const models = cards.map((m) => m.id);
    const wanted = localStorage.getItem(MODEL_STORE);
    takesImages = new Set(cards.filter((m) => m.architecture?.input_modalities?.includes('image')).map((m) => m.id));
    select.replaceChildren(...models.map((id) => new Option(id, id, false, id === wanted)));
    setImagesEnabled(takesImages.has(select.value));
    if (!models.length) showError('The server lists no models (a proxy with no healthy node?).');
    else if ($('error').textContent.startsWith('Cannot list models')) showError('');
  } catch (e) {
    select.replaceChildren();
    setImagesEnabled(false);
    showError(`Cannot list models: ${e.message}`);
  }
}

// ---- wiring ---------------------------------------------------------------------------------------------
export function initChat() {
  conversations = store.loadConversations();
  const currentId = store.loadCurrentId();
  current = conversations.find((c) => c.id === currentId) ?? conversations[0] ?? addConversation();

  const settings = store.loadSettings();
  $('system').value = settings.system ?? '';
  for (const input of document.querySelectorAll('[data-setting]')) input.value = settings[input.dataset.setting] ?? '';
  $('settings').addEventListener('input', () => store.saveSettings(readSettings()));
  if (window.matchMedia('(min-width: 801px)').matches) $('settings').open = true;

  $('model').addEventListener('change', () => {
    localStorage.setItem(MODEL_STORE, $('model').value);
    setImagesEnabled(takesImages.has($('model').value));
  });
  initAttach(showError);
  $('composer').addEventListener('submit', (e) => {
    e.preventDefault();
    const text = $('prompt').value;
    if (controller || (!text.trim() && !hasAttachments())) return;
    $('prompt').value = '';
    send(text);
  });
  $('prompt').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $('composer').requestSubmit();
    }
  });
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && controller) { e.preventDefault(); stop(); }
  });
  $('stop').addEventListener('click', stop);
  $('new-chat').addEventListener('click', () => {
    if (controller) return;
    current = current.messages.length ? addConversation() : current;
    save();
    render();
    $('prompt').focus();
  });
  render();
  loadModels();
}
