// Calls to the server this page came from. Paths are relative, so the page also works behind a path prefix.
// Errors become readable Error messages (the OpenAI error shape's `message`, else the status line).

const KEY_STORE = 'lmserve.apiKey';

export function getApiKey() { return localStorage.getItem(KEY_STORE) || ''; }
export function setApiKey(key) { localStorage.setItem(KEY_STORE, key); }

function headers(extra = {}) {
  const h = { ...extra };
  const key = getApiKey();
  if (key) h['Authorization'] = `Bearer ${key}`;
  return h;
}

export async function errorText(resp) {
  let detail = '';
  try {
    const text = await resp.text();
    try {
      const body = JSON.parse(text);
      detail = body?.error?.message ?? body?.detail ?? text;
      if (typeof detail !== 'string') detail = JSON.stringify(detail);
    } catch { detail = text; }
  } catch { /* body unreadable: the status line is all we have */ }
  const hint = resp.status === 401 ? ' (set the API key at the top of the page)' : '';
  return `${resp.status} ${resp.statusText}: ${detail || 'no details'}${hint}`;
}

export async function getJSON(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw new Error(await errorText(resp));
  return resp.json();
}

export async function getText(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw new Error(await errorText(resp));
  return resp.text();
}

// POST a streaming chat completion; yields parsed SSE chunks until `data: [DONE]`.
// Throws on an HTTP error, on an `error` event, and when the stream ends without [DONE] (server gone).
export async function* streamChat(body, signal) {
  let resp;
  try {
    resp = await fetch('v1/chat/completions', {
      method: 'POST', signal, body: JSON.stringify(body),
      headers: headers({ 'Content-Type': 'application/json', 'Accept': 'text/event-stream' }),
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new Error(`cannot reach the server: ${e.message}`);
  }
  if (!resp.ok) throw new Error(await errorText(resp));
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      throw new Error(`the connection to the server broke mid-reply: ${e.message}`);
    }
    if (chunk.done) break;
    buffer += decoder.decode(chunk.value, { stream: true }).replace(/\r\n/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('\n');
      if (!data) continue;
      if (data === '[DONE]') return;
      const obj = JSON.parse(data);
      if (obj.error) throw new Error(obj.error.message || JSON.stringify(obj.error));
      yield obj;
    }
  }
  throw new Error('the server closed the stream before the reply finished');
}
