// Entry point: tabs (Chat | Dashboard, also chosen by the URL hash), the API key field, then both views.
import { getApiKey, setApiKey } from './api.js';
import { initChat, loadModels } from './chat.js';
import { drawDashboard, initDashboard, refreshDashboard } from './dashboard.js';

const $ = (id) => document.getElementById(id);
const TABS = { chat: ['tab-chat', 'chat-view'], dashboard: ['tab-dashboard', 'dashboard-view'] };

function show(name) {
  for (const [key, [tab, view]] of Object.entries(TABS)) {
    const on = key === name;
    $(tab).setAttribute('aria-selected', String(on));
    $(tab).tabIndex = on ? 0 : -1;
    $(view).hidden = !on;
  }
  if (name === 'dashboard') requestAnimationFrame(drawDashboard);
  else $('prompt').focus();
}

function initTabs() {
  const names = Object.keys(TABS);
  for (const [name, [tab]] of Object.entries(TABS)) {
    $(tab).addEventListener('click', () => { history.replaceState(null, '', `#${name}`); show(name); });
    $(tab).addEventListener('keydown', (e) => {   // arrow keys move between tabs (WAI-ARIA tabs pattern)
      if (e.key !== 'ArrowLeft' && e.key !== 'ArrowRight') return;
      const next = names[(names.indexOf(name) + (e.key === 'ArrowRight' ? 1 : names.length - 1)) % names.length];
      $(TABS[next][0]).focus();
      $(TABS[next][0]).click();
    });
  }
  const fromHash = () => show(location.hash === '#dashboard' ? 'dashboard' : 'chat');
  window.addEventListener('hashchange', fromHash);
  fromHash();
}

function initApiKey() {
  const input = $('api-key');
  input.value = getApiKey();
  input.addEventListener('change', () => {
    setApiKey(input.value.trim());
    loadModels();
    refreshDashboard();
  });
}

initApiKey();
initChat();
initTabs();
initDashboard();
