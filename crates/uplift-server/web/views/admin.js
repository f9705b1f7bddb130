// For admins: the audit log (who did what, and what was refused) and the
// API tokens (create with a role and an expiry, see, revoke).
import { useState } from '../vendor/preact-hooks.js';
import { api } from '../lib/api.js';
import { Badge, ErrorNote, hashQuery, html, may, Pager, setHashQuery, Time, usePager, useResource, when } from '../lib/ui.js';

const ROLES = ['viewer', 'operator', 'release-manager', 'admin', 'enrollment'];

function AdminOnly({ caller, children }) {
  if (may(caller, 'administer')) return children;
  return html`<div class="note bad">Only an admin token may see this page; yours is a ${caller.role} token.</div>`;
}

export function Audit({ caller }) {
  const params = hashQuery();
  const filters = Object.fromEntries(['actor', 'action', 'target'].map((k) => [k, params.get(k) ?? '']).filter(([, v]) => v));
  const key = JSON.stringify(filters);
  const pager = usePager(key);
  const page = useResource(
    () => (may(caller, 'administer') ? api('GET', '/api/v1/audit', { query: { ...filters, before: pager.current, limit: 100 } }) : Promise.resolve(null)),
    [key, pager.current],
  );
  const [draft, setDraft] = useState(filters);
  const set = (k) => (e) => setDraft({ ...draft, [k]: e.target.value });
  const entries = page.data?.entries ?? [];
  return html`<${AdminOnly} caller=${caller}>
    <section>
      <h1>Audit log</h1>
      <form class="filters" onSubmit=${(e) => {
        e.preventDefault();
        setHashQuery('/audit', draft);
      }}>
        <label>Actor<input value=${draft.actor ?? ''} onInput=${set('actor')} placeholder="token 3 (ci)" /></label>
        <label>Action<input value=${draft.action ?? ''} onInput=${set('action')} placeholder="rollout.start" /></label>
        <label>Target<input value=${draft.target ?? ''} onInput=${set('target')} placeholder="rollout 4" /></label>
        <div class="filter-actions">
          <button type="submit" class="primary">Filter</button>
          <button type="button" onClick=${() => setHashQuery('/audit', {})}>Clear</button>
        </div>
      </form>
      <${ErrorNote} error=${page.error} title="Could not read the audit log" />
      <div class="table-wrap">
        <table id="audit-table">
          <thead><tr><th>When</th><th>Actor</th><th>Role</th><th>Action</th><th>Target</th><th>Result</th></tr></thead>
          <tbody>
            ${entries.map(
              (e) => html`<tr key=${e.id}>
                <td><time datetime=${e.at}>${when(e.at)}</time></td>
                <td>${e.actor}</td>
                <td>${e.role}</td>
                <td><code>${e.action}</code></td>
                <td>${e.target}</td>
                <td>${e.error ? html`<${Badge} tone="bad">${e.error.kind}<//> ${e.error.message}` : html`<${Badge} tone="ok">done<//>`}</td>
              </tr>`,
            )}
          </tbody>
        </table>
      </div>
      ${page.data && !entries.length ? html`<p class="empty">No entry matches.</p>` : null}
      <${Pager} pager=${pager} next=${page.data?.next} count=${entries.length} />
    </section>
  <//>`;
}

function CreateToken({ onCreated }) {
  const [form, setForm] = useState({ name: '', role: 'viewer', expires: '' });
  const [created, setCreated] = useState(null);
  const [error, setError] = useState(null);
  const set = (k) => (e) => setForm({ ...form, [k]: e.target.value });
  const submit = async (e) => {
    e.preventDefault();
    setError(null);
    const body = { name: form.name.trim(), role: form.role };
    if (form.expires) body.expires_in_secs = Number(form.expires);
    try {
      setCreated(await api('POST', '/api/v1/tokens', { body }));
      setForm({ ...form, name: '' });
      onCreated();
    } catch (err) {
      setError(err);
    }
  };
  return html`<form class="card" onSubmit=${submit} id="token-form">
    <h2>New token</h2>
    <div class="row">
      <label>Name<input name="name" required value=${form.name} onInput=${set('name')} placeholder="ci-pipeline" /></label>
      <label>Role<select name="role" value=${form.role} onChange=${set('role')}>${ROLES.map((r) => html`<option value=${r}>${r}</option>`)}</select></label>
      <label>Expires<select name="expires" value=${form.expires} onChange=${set('expires')}>
        <option value="">never</option>
        <option value="3600">in an hour</option>
        <option value="86400">in a day</option>
        <option value="2592000">in 30 days</option>
        <option value="31536000">in a year</option>
      </select></label>
    </div>
    <button type="submit" class="primary">Create token</button>
    <${ErrorNote} error=${error} title="The token was not created" />
    ${created
      ? html`<div class="note ok" role="status" id="token-secret">
          Token ${created.token.id} (${created.token.name}, ${created.token.role}) is made. Its secret is shown this once:
          <pre><code>${created.secret}</code></pre>
        </div>`
      : null}
  </form>`;
}

export function Tokens({ caller }) {
  const tokens = useResource(() => (may(caller, 'administer') ? api('GET', '/api/v1/tokens') : Promise.resolve([])), []);
  const [error, setError] = useState(null);
  const revoke = async (token) => {
    if (!confirm(`Revoke token ${token.id} (${token.name})? Whoever uses it is refused from the next request.`)) return;
    setError(null);
    try {
      await api('DELETE', `/api/v1/tokens/${token.id}`);
      tokens.reload();
    } catch (e) {
      setError(e);
    }
  };
  const list = [...(tokens.data ?? [])].reverse();
  return html`<${AdminOnly} caller=${caller}>
    <section>
      <h1>API tokens</h1>
      <${ErrorNote} error=${tokens.error ?? error} />
      <div class="table-wrap">
        <table id="token-table">
          <thead><tr><th>ID</th><th>Name</th><th>Role</th><th>Created</th><th>By</th><th>Expires</th><th>State</th><th></th></tr></thead>
          <tbody>
            ${list.map(
              (t) => html`<tr key=${t.id}>
                <td>${t.id}</td>
                <td>${t.name}</td>
                <td>${t.role}</td>
                <td><${Time} at=${t.created_at} /></td>
                <td>${t.created_by}</td>
                <td>${t.expires_at ? when(t.expires_at) : 'never'}</td>
                <td>${t.revoked_at
                  ? html`<${Badge} tone="off">revoked<//>`
                  : t.expires_at && new Date(t.expires_at) < new Date()
                    ? html`<${Badge} tone="off">expired<//>`
                    : html`<${Badge} tone="ok">active<//>`}</td>
                <td>${t.revoked_at ? null : html`<button type="button" class="danger small" onClick=${() => revoke(t)}>Revoke</button>`}</td>
              </tr>`,
            )}
          </tbody>
        </table>
      </div>
      <${CreateToken} onCreated=${tokens.reload} />
    </section>
  <//>`;
}
