// Shared pieces of the console: the html template tag, data loading,
// status badges (an icon and a word as well as a colour), progress bars,
// and formatting.
import { h } from '../vendor/preact.js';
import { useCallback, useEffect, useRef, useState } from '../vendor/preact-hooks.js';
import htm from '../vendor/htm.js';

export const html = htm.bind(h);

// What the roles may do, as the server's `Role::allows` says. Only to hide
// what would be refused; the server decides.
const GRANTS = {
  viewer: ['read'],
  operator: ['read', 'operate'],
  'release-manager': ['read', 'release'],
  admin: ['read', 'operate', 'release', 'administer'],
  enrollment: [],
};
export const may = (caller, permission) => (GRANTS[caller?.role] ?? []).includes(permission);

// Loads what `load` returns, again when `deps` change or `reload()` is
// called. Keeps the last good data while reloading, so live views do not
// flicker.
export function useResource(load, deps) {
  const [state, setState] = useState({ data: null, error: null, loading: true });
  const generation = useRef(0);
  const run = useCallback(() => {
    const mine = ++generation.current;
    setState((s) => ({ ...s, loading: true }));
    load().then(
      (data) => mine === generation.current && setState({ data, error: null, loading: false }),
      (error) => mine === generation.current && setState((s) => ({ data: s.data, error, loading: false })),
    );
  }, deps);
  useEffect(run, [run]);
  return { ...state, reload: run };
}

export function ErrorNote({ error, title }) {
  if (!error) return null;
  return html`<div class="note bad" role="alert">
    <strong>${title ?? 'The server refused'}</strong>
    ${error.kind ? html` <code>${error.kind}</code>` : null}: ${error.message}
  </div>`;
}

// tone: ok, busy, wait, warn, bad, off. The icon and the word carry the
// meaning; the colour only helps.
const TONES = {
  ok: '✓',
  busy: '↻',
  wait: '⏸',
  warn: '!',
  bad: '✕',
  off: '○',
  on: '●',
};

export function Badge({ tone, children, title }) {
  return html`<span class=${`badge ${tone}`} title=${title}>
    <span class="icon" aria-hidden="true">${TONES[tone] ?? '•'}</span>${children}
  </span>`;
}

const AGENT_STATES = {
  idle: ['ok', 'idle'],
  downloading: ['busy', 'downloading'],
  verifying: ['busy', 'verifying'],
  reboot_pending: ['busy', 'reboot pending'],
  awaiting_reboot: ['wait', 'awaiting reboot'],
  testing: ['busy', 'testing'],
  failed: ['bad', 'failed'],
  rolled_back: ['warn', 'rolled back'],
};

export function StateBadge({ state }) {
  if (!state) return html`<${Badge} tone="off">not reported<//>`;
  const [tone, label] = AGENT_STATES[state] ?? ['off', state];
  return html`<${Badge} tone=${tone}>${label}<//>`;
}

export function OnlineBadge({ online }) {
  return online ? html`<${Badge} tone="on">online<//>` : html`<${Badge} tone="off">offline<//>`;
}

const ROLLOUT_STATES = {
  running: ['busy', 'running'],
  awaiting_approval: ['wait', 'awaiting approval'],
  paused: ['warn', 'paused'],
  aborted: ['bad', 'aborted'],
  finished: ['ok', 'finished'],
  superseded: ['off', 'superseded'],
};

// A rollout's state: its engine's when it has one, else its derived status.
export function rolloutState(rollout) {
  if (rollout.status === 'superseded') return 'superseded';
  return rollout.progress?.state ?? rollout.status;
}

export function RolloutBadge({ rollout }) {
  const state = rolloutState(rollout);
  const [tone, label] = ROLLOUT_STATES[state] ?? ['off', state];
  return html`<${Badge} tone=${tone}>${label}<//>`;
}

const OUTCOMES = {
  succeeded: ['ok', 'succeeded'],
  failed: ['bad', 'failed'],
  timed_out: ['bad', 'timed out'],
  superseded: ['off', 'superseded'],
  withdrawn: ['off', 'withdrawn'],
};

export function OutcomeBadge({ outcome, offered }) {
  if (!outcome) return offered ? html`<${Badge} tone="busy">in progress<//>` : html`<${Badge} tone="off">not offered yet<//>`;
  const [tone, label] = OUTCOMES[outcome] ?? ['off', outcome];
  return html`<${Badge} tone=${tone}>${label}<//>`;
}

// A stacked bar: parts are {value, tone, label}; the text beside it says
// the same in words for those who cannot tell the colours apart. Widths
// are set through the style object (CSSOM), which the CSP allows; a style
// attribute in markup it would refuse.
export function Bar({ parts, total, label }) {
  const sum = total || parts.reduce((n, p) => n + p.value, 0) || 1;
  const words = parts.filter((p) => p.value > 0).map((p) => `${p.value} ${p.label}`).join(', ');
  return html`<div class="bar-line">
    <div class="bar" role="img" aria-label=${`${label ?? ''} ${words || 'nothing yet'}`}>
      ${parts.map((p) => (p.value > 0 ? html`<span class=${`part ${p.tone}`} style=${{ width: `${(100 * p.value) / sum}%` }} title=${`${p.value} ${p.label}`}></span>` : null))}
    </div>
    <span class="bar-words">${words || 'nothing yet'}</span>
  </div>`;
}

export function bytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

export function when(rfc3339) {
  if (!rfc3339) return '–';
  const date = new Date(rfc3339);
  if (Number.isNaN(date.getTime())) return rfc3339;
  return date.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
}

export function ago(rfc3339) {
  if (!rfc3339) return 'never';
  const seconds = Math.round((Date.now() - new Date(rfc3339).getTime()) / 1000);
  if (Number.isNaN(seconds)) return rfc3339;
  if (seconds < 5) return 'just now';
  if (seconds < 90) return `${seconds} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 129600) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} days ago`;
}

export function Time({ at }) {
  return html`<time datetime=${at} title=${when(at)}>${ago(at)}</time>`;
}

// Keyset paging: the API gives the next page's cursor; earlier cursors are
// remembered so "previous" goes back without counting rows.
export function usePager(resetKey) {
  const [cursors, setCursors] = useState([null]);
  useEffect(() => setCursors([null]), [resetKey]);
  const current = cursors[cursors.length - 1];
  return {
    current,
    page: cursors.length,
    next: (cursor) => cursor != null && setCursors((c) => [...c, cursor]),
    previous: () => setCursors((c) => (c.length > 1 ? c.slice(0, -1) : c)),
    first: () => setCursors([null]),
  };
}

export function Pager({ pager, next, count }) {
  return html`<nav class="pager" aria-label="pages">
    <button type="button" disabled=${pager.page === 1} onClick=${pager.previous}>← Previous</button>
    <span>Page ${pager.page}${count !== undefined ? ` · ${count} shown` : ''}</span>
    <button type="button" disabled=${next == null} onClick=${() => pager.next(next)}>Next →</button>
  </nav>`;
}

// Runs `action` for each item with at most `width` at once; resolves to
// the failures.
export async function eachLimited(items, width, action) {
  const failures = [];
  let index = 0;
  const worker = async () => {
    while (index < items.length) {
      const item = items[index++];
      try {
        await action(item);
      } catch (error) {
        failures.push({ item, error });
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(width, items.length) }, worker));
  return failures;
}

// The hash route's parameters (`#/devices?tag=lab`), and a way to change them.
export function hashQuery() {
  const hash = location.hash.slice(1);
  const at = hash.indexOf('?');
  return new URLSearchParams(at < 0 ? '' : hash.slice(at + 1));
}

export function setHashQuery(path, params) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) if (value !== undefined && value !== null && value !== '') query.set(key, value);
  const text = query.toString();
  location.hash = `#${path}${text ? `?${text}` : ''}`;
}
