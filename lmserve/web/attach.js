// Images attached to the next message (vision models only): file picker, paste and drag-and-drop. Each image is
// read into a data: URI in the browser and sent as an image_url part; nothing is uploaded anywhere else.
const $ = (id) => document.getElementById(id);
const MAX_BYTES = 16 << 20;      // larger files would not fit the server's default request body limit anyway

let pending = [];                // data: URIs waiting for the next Send
let enabled = false;
let onError = () => {};

function renderTray() {
  const tray = $('attachments');
  tray.replaceChildren(...pending.map((url, i) => {
    const item = document.createElement('div');
    item.className = 'attachment';
    const img = document.createElement('img');
    img.src = url;
    img.alt = `attached image ${i + 1}`;
    const remove = document.createElement('button');
    remove.type = 'button';
    remove.textContent = '×';
    remove.setAttribute('aria-label', `Remove image ${i + 1}`);
    remove.addEventListener('click', () => { pending.splice(i, 1); renderTray(); });
    item.append(img, remove);
    return item;
  }));
  tray.hidden = !pending.length;
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

export async function addFiles(files) {
  if (!enabled) return;
  for (const file of files) {
    if (!file.type.startsWith('image/')) { onError(`${file.name || 'the file'} is not an image`); continue; }
    if (file.size > MAX_BYTES) { onError(`${file.name} is larger than ${MAX_BYTES >> 20} MiB`); continue; }
    try {
      pending.push(await readAsDataURL(file));
    } catch (e) {
      onError(`cannot read ${file.name}: ${e.message}`);
    }
  }
  renderTray();
}

// The images for the message being sent (the tray empties).
export function takeAttachments() {
  const out = pending;
  pending = [];
  renderTray();
  return out;
}

export function hasAttachments() { return pending.length > 0; }

// Shown only when the selected model takes images (/v1/models architecture.input_modalities).
export function setImagesEnabled(on) {
  enabled = on;
  $('attach').hidden = !on;
  if (!on && pending.length) { pending = []; renderTray(); }
}

export function initAttach(reportError) {
  onError = reportError;
  const input = $('attach-input');
  $('attach').addEventListener('click', () => input.click());
  input.addEventListener('change', () => { addFiles([...input.files]); input.value = ''; });
  $('prompt').addEventListener('paste', (e) => {
    const files = [...(e.clipboardData?.files ?? [])].filter((f) => f.type.startsWith('image/'));
    if (enabled && files.length) { e.preventDefault(); addFiles(files); }
  });
  const zone = document.querySelector('.chat');
  zone.addEventListener('dragover', (e) => {
    if (!enabled || ![...(e.dataTransfer?.types ?? [])].includes('Files')) return;
    e.preventDefault();
    zone.classList.add('dropping');
  });
  zone.addEventListener('dragleave', () => zone.classList.remove('dropping'));
  zone.addEventListener('drop', (e) => {
    zone.classList.remove('dropping');
    if (!enabled || !e.dataTransfer?.files?.length) return;
    e.preventDefault();
    addFiles([...e.dataTransfer.files]);
  });
  setImagesEnabled(false);
}
