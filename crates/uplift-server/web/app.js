// The console's shell: log in with an API token, then a header with the
// views the token's role may use, the event stream's state, and the view
// the URL's hash names (`#/devices`, `#/rollouts/7`, ...).
import { render } from './vendor/preact.js';
import { useEffect, useState } from './vendor/preact-hooks.js';
import { api, onUnauthorized, session } from './lib/api.js';
import { startLive, stopLive, useStreamStatus } from './lib/live.js';
import { html, may } from './lib/ui.js';
import { Overview } from './views/overview.js';
import { Devices, DevicePage } from './views/devices.js';
import { Releases } from './views/releases.js';
import { NewRollout, RolloutPage, Rollouts } from './views/rollouts.js';
import { Audit, Tokens } from './views/admin.js';

function Login({ onLogin, refused }) {
  const [token, setToken] = useState('');
  const [error, setError] = useState(refused);
  const [busy, setBusy] = useState(false);
  const submit = async (event) => {
    event.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const caller = await api('GET', '/api/v1/whoami', { token: token.trim() });
      session.save(token.trim());
      onLogin(caller);
    } catch (e) {
      setError(e);
    } finally {
      setBusy(false);
    }
  };
  return html`<main class="login">
    <form class="card" onSubmit=${submit} id="login-form">
      <h1><img src="/assets/icon.svg" alt="" width="28" height="28" /> Uplift</h1>
      <p>Log in with an API token (<code>uplift token create</code>, or the server's <code>admin-token</code> file). It is kept in this tab only.</p>
      <label for="token">API token</label>
      <input id="token" name="token" type="password" autocomplete="off" required value=${token} onInput=${(e) => setToken(e.target.value)} />
      ${error ? html`<div class="note bad" role="alert" id="login-error">${error.status === 401 ? 'The server refused this token: ' : 'Could not log in: '}${error.message}</div>` : null}
      <button type="submit" class="primary" disabled=${busy}>${busy ? 'Checking…' : 'Log in'}</button>
    </form>
  </main>`;
}

function StreamIndicator() {
  const status = useStreamStatus();
  if (status.state === 'live') {
    return html`<span class="stream live" id="stream-status" title="Views update as the fleet changes">● Live</span>`;
  }
  const retrying = status.everLive || status.state === 'down';
  const text = retrying ? 'Disconnected, reconnecting…' : 'Connecting…';
  return html`<span class="stream down" id="stream-status" role="status" title=${status.why ?? ''}>○ ${text}</span>`;
}

const NAV = [
  ['#/', 'Overview', 'read'],
  ['#/devices', 'Devices', 'read'],
  ['#/releases', 'Releases', 'read'],
  ['#/rollouts', 'Rollouts', 'read'],
  ['#/audit', 'Audit log', 'administer'],
  ['#/tokens', 'Tokens', 'administer'],
];

function useHashRoute() {
  const [hash, setHash] = useState(location.hash || '#/');
  useEffect(() => {
    const changed = () => setHash(location.hash || '#/');
    addEventListener('hashchange', changed);
    return () => removeEventListener('hashchange', changed);
  }, []);
  return hash;
}

function route(hash, caller) {
  const path = hash.slice(1).split('?')[0];
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  const [view, id] = parts;
  switch (view) {
    case undefined:
      return html`<${Overview} caller=${caller} />`;
    case 'devices':
      return id ? html`<${DevicePage} id=${id} caller=${caller} />` : html`<${Devices} caller=${caller} />`;
    case 'releases':
      return html`<${Releases} caller=${caller} />`;
    case 'rollouts':
      if (id === 'new') return html`<${NewRollout} caller=${caller} />`;
      return id ? html`<${RolloutPage} id=${id} caller=${caller} />` : html`<${Rollouts} caller=${caller} />`;
    case 'audit':
      return html`<${Audit} caller=${caller} />`;
    case 'tokens':
      return html`<${Tokens} caller=${caller} />`;
    default:
      return html`<div class="note bad">No page ${path} here. <a href="#/">Go to the overview</a>.</div>`;
  }
}

function Shell({ caller, onLogout }) {
  const hash = useHashRoute();
  const current = '#/' + (hash.slice(2).split(/[/?]/)[0] || '');
  return html`<div class="shell">
    <header class="top">
      <a class="brand" href="#/"><img src="/assets/icon.svg" alt="" width="24" height="24" />Uplift</a>
      <nav class="views" aria-label="views">
        ${NAV.filter(([, , permission]) => may(caller, permission)).map(
          ([href, label]) => html`<a href=${href} class=${current === href ? 'current' : ''} aria-current=${current === href ? 'page' : undefined}>${label}</a>`,
        )}
      </nav>
      <div class="who">
        <${StreamIndicator} />
        <span id="whoami" title=${caller.name}><span class="role">${caller.role}</span> ${caller.name}</span>
        <button type="button" class="link" onClick=${onLogout} id="logout">Log out</button>
      </div>
    </header>
    <main class="view">${route(hash, caller)}</main>
  </div>`;
}

function App() {
  const [caller, setCaller] = useState(null);
  const [checking, setChecking] = useState(Boolean(session.token()));
  const [refused, setRefused] = useState(null);

  useEffect(() => {
    onUnauthorized((error) => {
      session.clear();
      stopLive();
      setRefused(error);
      setCaller(null);
    });
    if (!session.token()) return;
    api('GET', '/api/v1/whoami')
      .then(setCaller, () => {})
      .finally(() => setChecking(false));
  }, []);

  useEffect(() => {
    if (caller) startLive();
    return stopLive;
  }, [caller]);

  const logout = () => {
    session.clear();
    stopLive();
    setRefused(null);
    setCaller(null);
  };

  if (checking) return html`<p class="boot">Checking your session…</p>`;
  if (!caller) return html`<${Login} onLogin=${setCaller} refused=${refused} />`;
  return html`<${Shell} caller=${caller} onLogout=${logout} />`;
}

const root = document.getElementById('app');
// The loading note goes; Preact renders into an empty container.
root.textContent = '';
render(html`<${App} />`, root);
