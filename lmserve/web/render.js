// Turning model output into DOM. Model output never executes: raw HTML in the Markdown is escaped to text
// (marked's `html` renderer below), and the HTML marked produces still goes through DOMPurify before use.
import { marked } from './vendor/marked.esm.js';
import DOMPurify from './vendor/purify.es.mjs';

const ESCAPES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ESCAPES[c]);

marked.use({ gfm: true, renderer: { html: (token) => escapeHtml(token.text ?? token.raw ?? '') } });

DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A') { node.setAttribute('target', '_blank'); node.setAttribute('rel', 'noopener noreferrer'); }
});

export function copyButton(getText, label = 'Copy') {
  const b = document.createElement('button');
  b.type = 'button';
  b.className = 'copy';
  b.textContent = label;
  b.addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText(getText());
      b.textContent = 'Copied';
    } catch {
      b.textContent = 'Copy failed';
    }
    setTimeout(() => { b.textContent = label; }, 1200);
  });
  return b;
}

export function renderMarkdown(el, text) {
  el.innerHTML = DOMPurify.sanitize(marked.parse(text ?? ''), { FORBID_TAGS: ['style', 'form', 'input'] });
  for (const pre of el.querySelectorAll('pre')) {
    pre.appendChild(copyButton(() => pre.querySelector('code')?.textContent ?? pre.textContent, 'Copy code'));
  }
}

// Reasoning (delta.reasoning_content) as a collapsible block, open while it streams.
export function renderReasoning(el, text, isStreaming) {
  let details = el.querySelector(':scope > details.reasoning');
  if (!text) { details?.remove(); return; }
  if (!details) {
    details = document.createElement('details');
    details.className = 'reasoning';
    const summary = document.createElement('summary');
    summary.textContent = 'Reasoning';
    details.append(summary, document.createElement('div'));
    details.open = isStreaming;
    el.prepend(details);
  }
  renderMarkdown(details.lastElementChild, text);
}

// Tool calls (message.tool_calls / accumulated delta.tool_calls) as cards; arguments shown as text.
export function renderToolCalls(el, toolCalls) {
  el.querySelectorAll(':scope > .tool-call').forEach((n) => n.remove());
  for (const call of toolCalls ?? []) {
    const card = document.createElement('div');
    card.className = 'tool-call';
    const title = document.createElement('strong');
    title.textContent = `Tool call: ${call.function?.name ?? '?'}`;
    const args = document.createElement('pre');
    let pretty = call.function?.arguments ?? '';
    try { pretty = JSON.stringify(JSON.parse(pretty), null, 2); } catch { /* partial JSON while streaming */ }
    args.textContent = pretty;
    card.append(title, args);
    el.append(card);
  }
}

// Merge streamed tool-call deltas (OpenAI: by index; id/name once, arguments in pieces).
export function mergeToolCallDeltas(toolCalls, deltas) {
  for (const d of deltas) {
    const i = d.index ?? toolCalls.length;
    const call = toolCalls[i] ??= { id: d.id, type: d.type ?? 'function', function: { name: '', arguments: '' } };
    if (d.id) call.id = d.id;
    if (d.function?.name) call.function.name += d.function.name;
    if (d.function?.arguments) call.function.arguments += d.function.arguments;
  }
  return toolCalls;
}
