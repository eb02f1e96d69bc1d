// Conversations and settings kept in this browser's localStorage (nothing is stored on the server).
// A conversation: {id, title, updated, messages: [{role, content, reasoning?, tool_calls?, stats?, error?}]}.

const CONV_STORE = 'lmserve.conversations';
const CURRENT_STORE = 'lmserve.current';
const SETTINGS_STORE = 'lmserve.settings';

function read(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
}

export function loadConversations() { return read(CONV_STORE, []); }

export function saveConversations(conversations, currentId) {
  try {
    localStorage.setItem(CONV_STORE, JSON.stringify(conversations));
    localStorage.setItem(CURRENT_STORE, currentId ?? '');
  } catch (e) {
    console.warn('cannot save the conversations (storage full?)', e);
  }
}

export function loadCurrentId() { return localStorage.getItem(CURRENT_STORE) || null; }

export function newConversation() {
  const id = (crypto.randomUUID?.() ?? String(Date.now()) + Math.random().toString(16).slice(2));
  return { id, title: 'New chat', updated: Date.now(), messages: [] };
}

export function loadSettings() { return read(SETTINGS_STORE, {}); }
export function saveSettings(settings) { localStorage.setItem(SETTINGS_STORE, JSON.stringify(settings)); }
