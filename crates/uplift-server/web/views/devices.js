// Devices: the list with the API's filters and server-side pages (one page
// at a time, however large the fleet), tags for one device or a selection,
// and one device's page with its history as a timeline.
import { useEffect, useState } from '../vendor/preact-hooks.js';
import { api } from '../lib/api.js';
import { useLiveReload } from '../lib/live.js';
import {
  Badge,
  bytes,
  eachLimited,
  ErrorNote,
  hashQuery,
  html,
  may,
  OnlineBadge,
  Pager,
  setHashQuery,
  StateBadge,
  Time,
  usePager,
  useResource,
  when,
} from '../lib/ui.js';
import { DEVICE_EVENT_TONES, describeDeviceEvent } from './events.js';

const PAGE = 50;
const FILTERS = ['q', 'device_type', 'version', 'state', 'tag', 'online'];
const STATES = ['idle', 'downloading', 'verifying', 'reboot_pending', 'awaiting_reboot', 'testing', 'failed', 'rolled_back'];

const devicePath = (id) => `#/devices/${encodeURIComponent(id)}`;

function tagList(text) {
  return text
    .split(/[\s,]+/)
    .map((t) => t.trim())
    .filter(Boolean);
}

function Filters({ filters }) {
  const [draft, setDraft] = useState(filters);
  useEffect(() => setDraft(filters), [JSON.stringify(filters)]);
  const set = (key) => (e) => setDraft({ ...draft, [key]: e.target.value });
  const apply = (e) => {
    e.preventDefault();
    setHashQuery('/devices', draft);
  };
  return html`<form class="filters" onSubmit=${apply} id="device-filters">
    <label>Search<input name="q" type="search" placeholder="device or hardware ID" value=${draft.q ?? ''} onInput=${set('q')} /></label>
    <label>Type<input name="device_type" value=${draft.device_type ?? ''} onInput=${set('device_type')} /></label>
    <label>Version<input name="version" value=${draft.version ?? ''} onInput=${set('version')} /></label>
    <label>State<select name="state" value=${draft.state ?? ''} onChange=${set('state')}>
      <option value="">any</option>
      ${STATES.map((s) => html`<option value=${s}>${s.replace('_', ' ')}</option>`)}
    </select></label>
    <label>Tag<input name="tag" value=${draft.tag ?? ''} onInput=${set('tag')} /></label>
    <label>Online<select name="online" value=${draft.online ?? ''} onChange=${set('online')}>
      <option value="">any</option><option value="true">online</option><option value="false">offline</option>
    </select></label>
    <div class="filter-actions">
      <button type="submit" class="primary">Filter</button>
      <button type="button" onClick=${() => setHashQuery('/devices', {})}>Clear</button>
    </div>
  </form>`;
}

// Adds or removes tags on the selected devices, one request per device
// (the API's tag change is per device), a few at a time.
function BulkTags({ selected, onDone }) {
  const [text, setText] = useState('');
  const [result, setResult] = useState(null);
  const [busy, setBusy] = useState(false);
  const run = async (mode) => {
    const tags = tagList(text);
    if (!tags.length) return;
    setBusy(true);
    const failures = await eachLimited([...selected], 8, (id) =>
      api('PUT', `/api/v1/devices/${encodeURIComponent(id)}/tags`, { body: { [mode]: tags } }),
    );
    setBusy(false);
    setResult({ mode, tags, done: selected.size - failures.length, failures });
    onDone();
  };
  return html`<div class="bulk" id="bulk-tags">
    <strong>${selected.size} selected</strong>
    <input aria-label="tags for the selection" placeholder="tags, e.g. lab canary" value=${text} onInput=${(e) => setText(e.target.value)} id="bulk-tag-input" />
    <button type="button" disabled=${busy} onClick=${() => run('add')} id="bulk-tag-add">Add tags</button>
    <button type="button" disabled=${busy} onClick=${() => run('remove')} id="bulk-tag-remove">Remove tags</button>
    ${result
      ? html`<span class=${result.failures.length ? 'error-text' : 'ok-text'}>
          ${result.mode === 'add' ? 'Added' : 'Removed'} ${result.tags.join(', ')} on ${result.done} devices.
          ${result.failures.map((f) => html` ${f.item}: ${f.error.message}`)}
        </span>`
      : null}
  </div>`;
}

export function Devices({ caller }) {
  const params = hashQuery();
  const filters = Object.fromEntries(FILTERS.map((k) => [k, params.get(k) ?? '']).filter(([, v]) => v));
  const key = JSON.stringify(filters);
  const pager = usePager(key);
  const page = useResource(() => api('GET', '/api/v1/devices', { query: { ...filters, after: pager.current, limit: PAGE } }), [key, pager.current]);
  const [selected, setSelected] = useState(new Set());
  useEffect(() => setSelected(new Set()), [key, pager.current]);
  useLiveReload((e) => e.subject === 'device', page.reload, 3000);
  const canTag = may(caller, 'operate');
  const devices = page.data?.devices ?? [];
  const toggle = (id) => {
    const next = new Set(selected);
    if (next.has(id)) next.delete(id);
    else next.add(id);
    setSelected(next);
  };
  const allSelected = devices.length > 0 && devices.every((d) => selected.has(d.id));
  return html`<section>
    <h1>Devices</h1>
    <${PendingEnrollments} caller=${caller} onDecided=${page.reload} />
    <${Filters} filters=${filters} />
    <${ErrorNote} error=${page.error} title="Could not list devices" />
    ${canTag && selected.size ? html`<${BulkTags} selected=${selected} onDone=${page.reload} />` : null}
    <div class="table-wrap">
      <table class="devices" id="device-table">
        <thead><tr>
          ${canTag ? html`<th class="pick"><input type="checkbox" aria-label="select every device on this page" checked=${allSelected} onChange=${() => setSelected(allSelected ? new Set() : new Set(devices.map((d) => d.id)))} /></th>` : null}
          <th>Device</th><th>Hardware ID</th><th>Private address</th><th>Type</th><th>Version</th><th>State</th><th>Online</th><th>Tags</th><th>Last seen</th>
        </tr></thead>
        <tbody>
          ${devices.map(
            (d) => html`<tr key=${d.id} data-device=${d.id}>
              ${canTag ? html`<td class="pick"><input type="checkbox" aria-label=${`select ${d.id}`} checked=${selected.has(d.id)} onChange=${() => toggle(d.id)} /></td>` : null}
              <td><a href=${devicePath(d.id)}><code>${d.id}</code></a></td>
              <td>${d.hardware_id}</td>
              <td class="private-address">${d.private_addresses?.length ? d.private_addresses.join(' ') : '–'}</td>
              <td>${d.device_type}</td>
              <td>${d.running_version ?? '–'}${d.target_version && d.target_version !== d.running_version ? html` <span class="muted">→ ${d.target_version}</span>` : null}</td>
              <td><${StateBadge} state=${d.state} /></td>
              <td><${OnlineBadge} online=${d.online} /></td>
              <td class="tags">${d.tags.map((t) => html`<a class="tag" href=${`#/devices?tag=${encodeURIComponent(t)}`}>${t}</a>`)}</td>
              <td>${d.online ? 'now' : html`<${Time} at=${d.last_seen} />`}</td>
            </tr>`,
          )}
        </tbody>
      </table>
    </div>
    ${page.data && !devices.length ? html`<p class="empty">No device matches.</p>` : null}
    <${Pager} pager=${pager} next=${page.data?.next} count=${devices.length} />
  </section>`;
}

function TagEditor({ device, onChanged }) {
  const [text, setText] = useState('');
  const [error, setError] = useState(null);
  const change = async (body) => {
    setError(null);
    try {
      await api('PUT', `/api/v1/devices/${encodeURIComponent(device.id)}/tags`, { body });
      setText('');
      onChanged();
    } catch (e) {
      setError(e);
    }
  };
  return html`<div class="tag-editor">
    ${device.tags.map(
      (t) => html`<span class="tag">${t}<button type="button" class="link" aria-label=${`remove tag ${t}`} onClick=${() => change({ remove: [t] })}>×</button></span>`,
    )}
    <form class="inline" onSubmit=${(e) => {
      e.preventDefault();
      const tags = tagList(text);
      if (tags.length) change({ add: tags });
    }}>
      <input aria-label="tags to add" placeholder="add tags" value=${text} onInput=${(e) => setText(e.target.value)} id="device-tag-input" />
      <button type="submit">Add</button>
    </form>
    <${ErrorNote} error=${error} />
  </div>`;
}

// Decommissioning, for operators: the API says what it ends (key, channel,
// rollout parts, addresses) and keeps (the device and its history).
// Enrollment requests waiting for an operator (the server's approval
// mode); shown only when there are some. Polled: a device asking to enroll
// is not a fleet event yet.
function PendingEnrollments({ caller, onDecided }) {
  const pending = useResource(() => api('GET', '/api/v1/enrollments', { query: { state: 'pending' } }), []);
  const [error, setError] = useState(null);
  useEffect(() => {
    const timer = setInterval(pending.reload, 3000);
    return () => clearInterval(timer);
  }, [pending.reload]);
  const decide = async (request, verdict) => {
    let body;
    if (verdict === 'reject') {
      const reason = prompt(`Reject enrollment of ${request.hardware_id}? Its key is refused from now on. Reason (told to the device):`);
      if (reason === null) return;
      body = { reason };
    }
    setError(null);
    try {
      await api('POST', `/api/v1/enrollments/${request.id}/${verdict}`, body ? { body } : {});
      pending.reload();
      onDecided();
    } catch (e) {
      setError(e);
    }
  };
  const requests = pending.data ?? [];
  if (!requests.length && !error) return null;
  const canDecide = may(caller, 'operate');
  return html`<div class="card" id="pending-enrollments">
    <h2>Waiting to enroll (${requests.length})</h2>
    <${ErrorNote} error=${error} title="The server refused the decision" />
    <div class="table-wrap"><table>
      <thead><tr><th>Request</th><th>Hardware ID</th><th>Type</th><th>Key fingerprint</th><th>Asked</th>${canDecide ? html`<th></th>` : null}</tr></thead>
      <tbody>
        ${requests.map(
          (r) => html`<tr key=${r.id} data-enrollment=${r.id}>
            <td>${r.id}</td>
            <td>${r.hardware_id}</td>
            <td>${r.device_type}</td>
            <td><code title=${r.key_fingerprint}>${r.key_fingerprint.slice(0, 23)}…</code></td>
            <td><${Time} at=${r.requested_at} /></td>
            ${canDecide
              ? html`<td>
                  <button type="button" class="primary" data-accept=${r.id} onClick=${() => decide(r, 'accept')}>Accept</button>
                  <button type="button" class="danger" data-reject=${r.id} onClick=${() => decide(r, 'reject')}>Reject</button>
                </td>`
              : null}
          </tr>`,
        )}
      </tbody>
    </table></div>
  </div>`;
}

function RemoveDevice({ device, onRemoved }) {
  const [error, setError] = useState(null);
  const remove = async () => {
    if (!confirm(`Remove device ${device.id}? Its key is revoked and its channel closed now; its history is kept. A replaced board enrolls again as a new device.`)) return;
    setError(null);
    try {
      await api('DELETE', `/api/v1/devices/${encodeURIComponent(device.id)}`);
      onRemoved();
    } catch (e) {
      setError(e);
    }
  };
  return html`<button type="button" class="danger" id="device-remove" onClick=${remove}>Remove device</button>
    <${ErrorNote} error=${error} />`;
}

function Timeline({ id }) {
  const [before, setBefore] = useState(null);
  const [older, setOlder] = useState([]);
  const first = useResource(() => api('GET', `/api/v1/devices/${encodeURIComponent(id)}/history`, { query: { limit: 50 } }), [id]);
  useLiveReload((e) => e.subject === 'device' && e.device_id === id, first.reload, 1000);
  const more = async () => {
    const page = await api('GET', `/api/v1/devices/${encodeURIComponent(id)}/history`, { query: { limit: 50, before } });
    setOlder([...older, ...page.events]);
    setBefore(page.next);
  };
  useEffect(() => {
    setOlder([]);
    setBefore(first.data?.next ?? null);
  }, [first.data?.next]);
  const events = [...(first.data?.events ?? []), ...older];
  return html`<div class="card">
    <h2>History</h2>
    <${ErrorNote} error=${first.error} />
    ${events.length
      ? html`<ol class="timeline" id="device-history">
          ${events.map(
            (e) => html`<li key=${e.id} class=${DEVICE_EVENT_TONES[e.kind] ?? ''}>
              <span class="dot" aria-hidden="true"></span>
              <time datetime=${e.at}>${when(e.at)}</time>
              <span>${describeDeviceEvent(e)}</span>
            </li>`,
          )}
        </ol>`
      : html`<p class="empty">Nothing recorded yet.</p>`}
    ${before ? html`<button type="button" onClick=${more}>Older events</button>` : null}
  </div>`;
}

export function DevicePage({ id, caller }) {
  const device = useResource(() => api('GET', `/api/v1/devices/${encodeURIComponent(id)}`), [id]);
  useLiveReload((e) => e.subject === 'device' && e.device_id === id, device.reload, 1000);
  const d = device.data;
  return html`<section>
    <p class="crumbs"><a href="#/devices">Devices</a> /</p>
    <h1><code>${id}</code></h1>
    <${ErrorNote} error=${device.error} title="Could not load the device" />
    ${d
      ? html`<div class="card">
          <dl class="facts" id="device-facts">
            <dt>Device ID</dt><dd><code>${d.id}</code></dd>
            <dt>Hardware ID</dt><dd>${d.hardware_id}</dd>
            <dt>Private address</dt><dd id="device-private-address">${d.private_addresses?.length ? d.private_addresses.join(', ') : '–'}</dd>
            <dt>Connected from</dt><dd>${d.address ?? '–'}</dd>
            <dt>Type</dt><dd>${d.device_type}</dd>
            <dt>Version</dt><dd>${d.running_version ?? 'not reported'}</dd>
            <dt>Slot</dt><dd>${d.slot ?? '–'}</dd>
            <dt>Online</dt><dd><${OnlineBadge} online=${d.online} />${d.online ? null : html` last seen <${Time} at=${d.last_seen} />`}</dd>
            <dt>State</dt><dd><${StateBadge} state=${d.state} /></dd>
            <dt>Target</dt><dd>${d.target_version ? html`${d.target_version}${d.rollout_id ? html` by <a href=${`#/rollouts/${d.rollout_id}`}>rollout ${d.rollout_id}</a>` : null}` : 'none'}</dd>
            ${d.progress
              ? html`<dt>Download</dt><dd>${bytes(d.progress.done_bytes)} of ${bytes(d.progress.total_bytes)} (${bytes(d.progress.fetched_bytes)} fetched)</dd>`
              : null}
            ${d.last_error ? html`<dt>Last error</dt><dd><${Badge} tone="bad">${d.last_error.kind}<//> ${d.last_error.message}</dd>` : null}
            <dt>Enrolled</dt><dd>${when(d.enrolled_at)}</dd>
            ${d.removed_at
              ? html`<dt>Removed</dt><dd><${Badge} tone="off">removed<//> ${when(d.removed_at)}: key revoked, history kept</dd>`
              : html`<dt>Tags</dt><dd>${may(caller, 'operate') ? html`<${TagEditor} device=${d} onChanged=${device.reload} />` : d.tags.join(', ') || 'none'}</dd>`}
          </dl>
          ${!d.removed_at && may(caller, 'operate') ? html`<${RemoveDevice} device=${d} onRemoved=${device.reload} />` : null}
        </div>`
      : null}
    <${Timeline} id=${id} />
  </section>`;
}
