// llm-proxy web UI: plain DOM, no libraries. API data only ever reaches the page through textContent.
'use strict';

const KEY_STORE = 'llm-proxy.key';
const $ = (id) => document.getElementById(id);
const SVG_NS = 'http://www.w3.org/2000/svg';

// -- small helpers --------------------------------------------------------------------------------

/** Build an element: attributes set one by one, children appended as nodes or text (never parsed as HTML). */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child !== undefined && child !== null) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

function showError(id, err) {
  const box = $(id);
  box.textContent = err ? err.message : '';
  box.hidden = !err;
}

const usd = (v) => (v === null || v === undefined || v === '' ? '—' : '$' + Number(v).toFixed(Number(v) && Math.abs(v) < 0.01 ? 6 : 2));
const num = (v) => (v === null || v === undefined ? '—' : Number(v).toLocaleString());
const toDate = (t) => new Date(typeof t === 'number' ? t * 1000 : t);
const day = (t) => (t ? toDate(t).toLocaleDateString() : '—');
const when = (t) => (t ? toDate(t).toLocaleString() : '—');

/** Rows of a list answer, whatever the envelope: [..], {data: [..]}, {keys: [..]}, {usage: [..]}, ... */
function listOf(body) {
  if (Array.isArray(body)) return body;
  for (const name of ['data', 'keys', 'usage', 'groups', 'rows', 'requests', 'items']) {
    if (body && Array.isArray(body[name])) return body[name];
  }
  return [];
}

// -- the API --------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status, type) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

function authHeaders(extra) {
  const key = sessionStorage.getItem(KEY_STORE);
  return Object.assign(key ? { Authorization: 'Bearer ' + key } : {}, extra || {});
}

/** Raise the API's own error message for a failed response. */
async function raiseFor(resp) {
  let message = `HTTP ${resp.status}`;
  let type = '';
  try {
    const body = await resp.json();
    if (body && body.error) {
      message = body.error.message || message;
      type = body.error.type || '';
    }
  } catch (_) { /* not JSON: keep the status line */ }
  if (resp.status === 401 && !sessionStorage.getItem(KEY_STORE)) message = 'Enter an API key above first.';
  throw new ApiError(message, resp.status, type);
}

/** Call the API with the stored key; JSON in, JSON out; errors raised as ApiError. */
async function api(method, path, body) {
  const init = { method, headers: authHeaders(body ? { 'Content-Type': 'application/json' } : {}) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const resp = await fetch(path, init);
  if (!resp.ok) await raiseFor(resp);
  return resp.status === 204 ? null : resp.json();
}

/** A clearer message when a whole section is unavailable to this key or on this server. */
function explain(err, what) {
  if (err.status === 404 && err.type !== 'request_not_found') {
    return new ApiError(`This server does not offer ${what} (404).`, 404, err.type);
  }
  if (err.status === 403 && err.type === 'permission_error') {
    return new ApiError(`${what[0].toUpperCase() + what.slice(1)} needs the admin key (ADMIN_API_KEY); this is a client key.`, 403, err.type);
  }
  return err;
}

// -- key and tabs ---------------------------------------------------------------------------------

const loaders = {};
let currentTab = 'playground';

function noteKey() {
  $('key-note').textContent = sessionStorage.getItem(KEY_STORE)
    ? 'A key is set for this browser tab (kept in sessionStorage).' : 'No key set: enter one to use the API.';
}

function selectTab(name) {
  currentTab = name;
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const on = tab.id === 'tab-' + name;
    tab.setAttribute('aria-selected', String(on));
    tab.tabIndex = on ? 0 : -1;
    $(tab.getAttribute('aria-controls')).hidden = !on;
  }
  if (loaders[name]) loaders[name]();
}

function setupTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  tabs.forEach((tab, i) => {
    tab.addEventListener('click', () => selectTab(tab.id.slice(4)));
    tab.addEventListener('keydown', (ev) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[ev.key];
      if (!step) return;
      const next = tabs[(i + step + tabs.length) % tabs.length];
      next.focus();
      selectTab(next.id.slice(4));
    });
  });
  $('key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const key = $('api-key').value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key);
    $('api-key').value = '';
    noteKey();
    loaders.models();
    selectTab(currentTab);
  });
  $('key-forget').addEventListener('click', () => {
    sessionStorage.removeItem(KEY_STORE);
    noteKey();
  });
}

// -- playground -----------------------------------------------------------------------------------

let chatAbort = null;

loaders.models = async function loadModels() {
  const select = $('chat-model');
  const chosen = select.value || sessionStorage.getItem('llm-proxy.model');
  try {
    const models = listOf(await api('GET', '/v1/models')).map((m) => m.id).sort();
    if (!models.includes('echo')) models.unshift('echo'); // the built-in echo provider is always there
    select.replaceChildren(...models.map((id) => el('option', { value: id }, id)));
    if (chosen && models.includes(chosen)) select.value = chosen;
    showError('chat-error', null);
  } catch (err) {
    if (!select.options.length) select.replaceChildren(el('option', { value: 'echo' }, 'echo'));
    showError('chat-error', err);
  }
};

function showMeta(info) {
  const rows = [];
  for (const [label, value] of Object.entries(info)) {
    if (value !== undefined && value !== null && value !== '') rows.push(el('div', {}, el('dt', {}, label), el('dd', {}, value)));
  }
  $('chat-meta').replaceChildren(...rows);
}

function tokenText(usage) {
  if (!usage) return '—';
  return `${num(usage.total_tokens)} (prompt ${num(usage.prompt_tokens)}, completion ${num(usage.completion_tokens)})`;
}

/** Read an SSE body, calling onEvent with each parsed `data:` JSON until [DONE]; true when [DONE] came. */
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, '');
      buffer = buffer.slice(end + 1);
      if (!line.startsWith('data:')) continue;
      const data = line.slice(5).trim();
      if (data === '[DONE]') return true;
      if (data) onEvent(JSON.parse(data));
    }
  }
}

async function sendChat(ev) {
  ev.preventDefault();
  const stream = $('chat-stream').checked;
  const messages = [];
  if ($('chat-system').value.trim()) messages.push({ role: 'system', content: $('chat-system').value });
  messages.push({ role: 'user', content: $('chat-user').value });
  const body = { model: $('chat-model').value, messages, stream };
  if (stream) body.stream_options = { include_usage: true };
  const calls = $('chat-calls').value.trim();
  const headers = authHeaders({ 'Content-Type': 'application/json' });
  if (calls && calls !== '1') headers['x-llm-num-calls'] = calls;
  sessionStorage.setItem('llm-proxy.model', body.model);

  const answer = $('chat-answer');
  answer.textContent = '';
  showError('chat-error', null);
  showMeta({});
  chatAbort = new AbortController();
  $('chat-send').disabled = true;
  $('chat-stop').disabled = false;
  const started = performance.now();
  let firstByte = null;
  let usage = null;
  let resp = null;
  try {
    resp = await fetch('/v1/chat/completions', { method: 'POST', headers, body: JSON.stringify(body), signal: chatAbort.signal });
    if (!resp.ok) await raiseFor(resp);
    if (stream) {
      const finished = await readEvents(resp, (event) => {
        if (event.error) throw new ApiError(event.error.message || 'The stream failed.', 502, event.error.type);
        if (event.usage) usage = event.usage;
        const delta = event.choices && event.choices[0] && event.choices[0].delta;
        if (delta && delta.content) {
          if (firstByte === null) firstByte = performance.now() - started;
          answer.append(delta.content);
        }
      });
      if (!finished) throw new ApiError('The stream ended before [DONE].', 0, 'incomplete');
    } else {
      const data = await resp.json();
      const message = data.choices && data.choices[0] && data.choices[0].message;
      answer.textContent = (message && message.content) || '';
      if (message && message.tool_calls) answer.append('\n[tool calls] ' + JSON.stringify(message.tool_calls, null, 2));
      usage = data.usage;
    }
  } catch (err) {
    showError('chat-error', err.name === 'AbortError' ? new Error('Stopped.') : err);
  } finally {
    const total = performance.now() - started;
    const h = (name) => (resp ? resp.headers.get(name) : null);
    const cost = h('x-llm-cost');
    showMeta({
      Provider: h('x-llm-provider'),
      Model: h('x-llm-model'),
      Latency: `${Math.round(total)} ms` + (firstByte !== null ? ` (first token ${Math.round(firstByte)} ms)` : ''),
      Tokens: tokenText(usage),
      Cost: cost !== null ? usd(cost) : (stream && resp && resp.ok ? 'see Usage (streams send no cost header)' : '—'),
      Attempts: h('x-llm-attempts'),
      Cache: h('x-cache'),
      'Request ID': h('x-request-id'),
    });
    $('chat-send').disabled = false;
    $('chat-stop').disabled = true;
    chatAbort = null;
  }
}

// -- keys -----------------------------------------------------------------------------------------

let keyNames = {};
let editing = null;

/** An optional number field: empty is null (no limit), anything else a number. */
function optNumber(id) {
  const raw = $(id).value.trim();
  return raw === '' ? null : Number(raw);
}

function modelList(id) {
  const names = $(id).value.split(',').map((s) => s.trim()).filter(Boolean);
  return names.length ? names : null;
}

function keyModels(key) {
  const models = typeof key.models === 'string' ? JSON.parse(key.models || 'null') : key.models;
  return Array.isArray(models) && models.length ? models.join(', ') : 'all';
}

function keyRevoked(key) {
  return Boolean(key.revoked_at || key.revoked || key.status === 'revoked');
}

function keySpend(key) {
  return key.spend ?? key.spend_usd ?? (key.spend_nusd !== undefined ? key.spend_nusd / 1e9 : null);
}

loaders.keys = async function loadKeys() {
  const table = $('keys-table');
  try {
    const keys = listOf(await api('GET', '/api/keys'));
    keyNames = Object.fromEntries(keys.map((k) => [k.id, k.name || k.id]));
    showError('keys-error', null);
    const head = el('tr', {}, ...['Name', 'Key', 'RPM', 'TPM', 'Budget', 'Spend', 'Models', 'Provider keys', 'Created', 'State', '']
      .map((t) => el('th', { scope: 'col' }, t)));
    const rows = keys.map((k) => {
      const revoked = keyRevoked(k);
      const actions = revoked ? '' : el('div', { class: 'row' },
        el('button', { type: 'button', class: 'secondary', onclick: () => startEdit(k) }, 'Edit'),
        el('button', { type: 'button', class: 'danger', onclick: () => revokeKey(k) }, 'Revoke'));
      return el('tr', { class: revoked ? 'revoked' : null },
        el('td', {}, k.name || '—'), el('td', {}, el('code', {}, (k.key_prefix || k.prefix || k.id) + '…')),
        el('td', {}, num(k.rpm_limit)), el('td', {}, num(k.tpm_limit)), el('td', {}, usd(k.max_budget)),
        el('td', {}, usd(keySpend(k))), el('td', {}, keyModels(k)), el('td', {}, (k.provider_keys || []).join(', ') || '—'), el('td', {}, day(k.created_at)),
        el('td', {}, revoked ? 'revoked' : 'live'), el('td', {}, actions));
    });
    table.replaceChildren(el('thead', {}, head), el('tbody', {}, ...rows));
    if (!keys.length) table.append(el('caption', {}, 'No virtual keys yet.'));
  } catch (err) {
    table.replaceChildren();
    showError('keys-error', explain(err, 'the keys API'));
  }
};

async function createKey(ev) {
  ev.preventDefault();
  const body = { name: $('new-name').value.trim() };
  for (const [field, id] of [['rpm_limit', 'new-rpm'], ['tpm_limit', 'new-tpm'], ['max_budget', 'new-budget']]) {
    const value = optNumber(id);
    if (value !== null) body[field] = value;
  }
  const models = modelList('new-models');
  if (models) body.models = models;
  try {
    const created = await api('POST', '/api/keys', body);
    $('key-created-value').textContent = created.key || created.virtualKey || '';
    $('key-created').hidden = false;
    $('key-create').reset();
    showError('keys-error', null);
    loaders.keys();
  } catch (err) {
    showError('keys-error', explain(err, 'the keys API'));
  }
}

function startEdit(key) {
  editing = key.id;
  $('key-edit-title').textContent = `Edit limits of ${key.name || key.id}`;
  $('edit-rpm').value = key.rpm_limit ?? '';
  $('edit-tpm').value = key.tpm_limit ?? '';
  $('edit-budget').value = key.max_budget ?? '';
  const models = keyModels(key);
  $('edit-models').value = models === 'all' ? '' : models;
  $('key-edit').hidden = false;
  $('edit-rpm').focus();
}

async function saveEdit(ev) {
  ev.preventDefault();
  const body = { rpm_limit: optNumber('edit-rpm'), tpm_limit: optNumber('edit-tpm'),
    max_budget: optNumber('edit-budget'), models: modelList('edit-models') };
  try {
    await api('PATCH', `/api/keys/${encodeURIComponent(editing)}`, body);
    $('key-edit').hidden = true;
    showError('keys-error', null);
    loaders.keys();
  } catch (err) {
    showError('keys-error', err);
  }
}

async function revokeKey(key) {
  if (!window.confirm(`Revoke the key "${key.name || key.id}"? Clients using it will get 401 at once.`)) return;
  try {
    await api('DELETE', `/api/keys/${encodeURIComponent(key.id)}`);
    loaders.keys();
  } catch (err) {
    showError('keys-error', err);
  }
}

// -- usage ----------------------------------------------------------------------------------------

const GROUPS = [['day', 'per day'], ['model', 'per model'], ['key', 'per key']];

function groupLabel(row, by) {
  const value = row[by] ?? row.group ?? row[by + '_id'] ?? row.name ?? row.key_id ?? row.date;
  if (by === 'key') return value === null || value === undefined ? '(static / admin key)' : keyNames[value] || value;
  return value === null || value === undefined ? '—' : String(value);
}

function rowCost(row) {
  const v = row.cost ?? row.cost_usd ?? row.spend ?? (row.cost_nusd !== undefined ? row.cost_nusd / 1e9 : 0);
  return Number(v) || 0;
}

function rowTokens(row) {
  const v = row.total_tokens ?? row.tokens ?? (Number(row.prompt_tokens || 0) + Number(row.completion_tokens || 0));
  return Number(v) || 0;
}

/** A horizontal bar chart: one row per group, an inline-SVG bar scaled to the largest value. */
function barChart(title, rows, value, format) {
  const max = Math.max(0, ...rows.map((r) => value(r)));
  const list = el('div', { class: 'bars', role: 'list' });
  for (const row of rows) {
    const v = value(row);
    const bar = svg('svg', { class: 'bar', viewBox: '0 0 100 10', preserveAspectRatio: 'none', 'aria-hidden': 'true' });
    bar.append(svg('rect', { x: 0, y: 0, height: 10, width: max ? Math.max(0.5, (100 * v) / max) : 0 }));
    list.append(el('div', { class: 'bar-row', role: 'listitem' },
      el('span', { class: 'bar-label', title: row.label }, row.label), bar, el('span', { class: 'bar-value' }, format(v))));
  }
  if (!rows.length) list.append(el('p', { class: 'note' }, 'No usage yet.'));
  return el('figure', { class: 'chart' }, el('figcaption', {}, title), list);
}

function totalsCard(total) {
  const items = [['Requests', num(total.requests)], ['Errors', num(total.errors)],
    ['Tokens', num(rowTokens(total))], ['Spend', usd(rowCost(total))]];
  return el('section', { class: 'card' }, el('h3', {}, 'All time'),
    el('dl', { class: 'meta totals' }, ...items.map(([k, v]) => el('div', {}, el('dt', {}, k), el('dd', {}, v)))));
}

loaders.usage = async function loadUsage() {
  const charts = $('usage-charts');
  showError('usage-error', null);
  try {
    if (!Object.keys(keyNames).length) {
      keyNames = Object.fromEntries(listOf(await api('GET', '/api/keys').catch(() => [])).map((k) => [k.id, k.name || k.id]));
    }
    const cards = [];
    for (const [by, label] of GROUPS) {
      const answer = await api('GET', `/api/usage?group_by=${by}`);
      if (by === 'day' && answer.total) cards.push(totalsCard(answer.total));
      const rows = listOf(answer).map((r) => Object.assign({ label: groupLabel(r, by) }, r));
      if (by === 'day') rows.sort((a, b) => String(a.label).localeCompare(String(b.label)));
      else rows.sort((a, b) => rowCost(b) - rowCost(a) || rowTokens(b) - rowTokens(a));
      cards.push(el('section', { class: 'card' }, el('h3', {}, 'Usage ' + label),
        barChart('Spend (USD)', rows, rowCost, usd), barChart('Tokens', rows, rowTokens, num)));
    }
    charts.replaceChildren(...cards);
  } catch (err) {
    charts.replaceChildren();
    showError('usage-error', explain(err, 'the usage API'));
  }
  loadRecent();
};

/** The latest requests, when the admin API offers them; otherwise a note says so. */
async function loadRecent() {
  const table = $('recent-table');
  try {
    const rows = listOf(await api('GET', '/api/usage/recent?limit=50'));
    $('recent-note').textContent = rows.length ? '' : 'No requests yet.';
    const head = el('tr', {}, ...['Time', 'Key', 'Model', 'Provider', 'Status', 'Tokens', 'Cost', 'Latency', 'Request ID']
      .map((t) => el('th', { scope: 'col' }, t)));
    const body = rows.map((r) => el('tr', {},
      el('td', {}, when(r.created_at ?? r.time)), el('td', {}, groupLabel({ key: r.key_id ?? r.key }, 'key')),
      el('td', {}, r.model || '—'), el('td', {}, r.provider || '—'),
      el('td', {}, (r.status || '—') + (r.cached ? ' (cached)' : '')), el('td', {}, num(rowTokens(r))),
      el('td', {}, usd(rowCost(r))), el('td', {}, r.latency_ms != null ? `${Math.round(r.latency_ms)} ms` : '—'),
      el('td', {}, el('code', {}, r.request_id || '—'))));
    table.replaceChildren(el('thead', {}, head), el('tbody', {}, ...body));
  } catch (err) {
    table.replaceChildren();
    $('recent-note').textContent = explain(err, 'a list of recent requests').message;
  }
}

// -- status ---------------------------------------------------------------------------------------

loaders.status = async function loadStatus() {
  const table = $('status-table');
  try {
    const data = await api('GET', '/api/status');
    const providers = data.providers || {};
    const names = Object.keys(providers).sort((a, b) =>
      Number(Boolean(providers[b].configured)) - Number(Boolean(providers[a].configured)) || a.localeCompare(b));
    showError('status-error', null);
    $('status-note').textContent = data.window_seconds
      ? `Counts cover the last ${Math.round(data.window_seconds / 60)} minutes; circuits are this worker's view.` : '';
    const head = el('tr', {}, ...['Provider', 'Configured', 'Circuit', 'Requests', 'Errors', 'Last latency', 'Last error']
      .map((t) => el('th', { scope: 'col' }, t)));
    table.replaceChildren(el('thead', {}, head), el('tbody', {}, ...names.map((name) => {
      const p = providers[name];
      const error = p.last_error ? `${p.last_error} (${when(p.last_error_at)})` : '—';
      return el('tr', { class: p.configured ? null : 'muted' },
        el('th', { scope: 'row' }, name), el('td', {}, p.configured ? 'yes' : (p.enabled === false ? 'disabled' : 'no')),
        el('td', {}, el('span', { class: 'pill ' + (p.circuit || 'unknown') }, (p.circuit || '—').replace('_', ' '))),
        el('td', {}, num(p.requests)), el('td', {}, num(p.errors)),
        el('td', {}, p.last_latency_ms != null ? `${Math.round(p.last_latency_ms)} ms` : '—'), el('td', { class: 'wrap' }, error));
    })));
  } catch (err) {
    table.replaceChildren();
    $('status-note').textContent = '';
    showError('status-error', explain(err, 'the status API'));
  }
};

// -- start ----------------------------------------------------------------------------------------

document.addEventListener('DOMContentLoaded', () => {
  setupTabs();
  noteKey();
  $('chat-form').addEventListener('submit', sendChat);
  $('chat-stop').addEventListener('click', () => chatAbort && chatAbort.abort());
  $('models-refresh').addEventListener('click', loaders.models);
  $('key-create').addEventListener('submit', createKey);
  $('key-edit').addEventListener('submit', saveEdit);
  $('key-edit-cancel').addEventListener('click', () => { $('key-edit').hidden = true; });
  $('key-copy').addEventListener('click', () => navigator.clipboard && navigator.clipboard.writeText($('key-created-value').textContent));
  $('keys-refresh').addEventListener('click', loaders.keys);
  $('usage-refresh').addEventListener('click', loaders.usage);
  $('status-refresh').addEventListener('click', loaders.status);
  loaders.models();
});
