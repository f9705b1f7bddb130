// The fleet at a glance: counts, devices per version, rollouts in
// progress, and the newest events as they happen.
import { useState } from '../vendor/preact-hooks.js';
import { api } from '../lib/api.js';
import { recentEvents, useEvents, useLiveReload } from '../lib/live.js';
import { Bar, ErrorNote, html, RolloutBadge, rolloutState, Time, useResource } from '../lib/ui.js';
import { describeEvent } from './events.js';

function Count({ label, value, tone, href, id }) {
  const body = html`<span class="count-value">${value ?? '–'}</span><span class="count-label">${label}</span>`;
  return href ? html`<a class=${`count ${tone ?? ''}`} href=${href} id=${id}>${body}</a>` : html`<div class=${`count ${tone ?? ''}`} id=${id}>${body}</div>`;
}

// Horizontal bars, one per version, longest first; each links to the
// devices running it.
function VersionChart({ versions, total }) {
  if (!versions.length) return html`<p class="empty">No device has reported a version yet.</p>`;
  const most = Math.max(...versions.map((v) => v.devices), 1);
  return html`<ol class="chart" aria-label="devices per version">
    ${versions.map(
      (v) => html`<li>
        <a class="chart-label" href=${v.version ? `#/devices?version=${encodeURIComponent(v.version)}` : '#/devices'}>${v.version ?? 'not reported'}</a>
        <span class="chart-track"><span class="chart-fill" style=${{ width: `${(100 * v.devices) / most}%` }}></span></span>
        <span class="chart-value">${v.devices}<small> (${Math.round((100 * v.devices) / (total || 1))} %${v.online !== undefined ? `, ${v.online} online` : ''})</small></span>
      </li>`,
    )}
  </ol>`;
}

function ActiveRollouts({ rollouts }) {
  const active = rollouts.filter((r) => !['finished', 'aborted', 'superseded'].includes(rolloutState(r))).reverse();
  if (!active.length) return html`<p class="empty">No rollout in progress. <a href="#/rollouts/new">Start one</a>.</p>`;
  return html`<ul class="plain">
    ${active.map(
      (r) => html`<li class="rollout-line">
        <a href=${`#/rollouts/${r.id}`}>Rollout ${r.id}: ${r.release}</a> <${RolloutBadge} rollout=${r} />
        <${Bar}
          label=${`rollout ${r.id}`}
          total=${r.devices_total}
          parts=${[
            { value: r.counts.succeeded, tone: 'ok', label: 'succeeded' },
            { value: r.counts.failed, tone: 'bad', label: 'failed' },
            { value: r.counts.in_progress, tone: 'busy', label: 'in progress' },
            { value: r.counts.pending, tone: 'off', label: 'pending' },
          ]}
        />
        ${r.progress?.paused_because ? html`<p class="note warn">${r.progress.paused_because}</p>` : null}
      </li>`,
    )}
  </ul>`;
}

export function Overview() {
  const fleet = useResource(() => api('GET', '/api/v1/fleet'), []);
  const rollouts = useResource(() => api('GET', '/api/v1/rollouts'), []);
  const [events, setEvents] = useState(recentEvents);
  useLiveReload(() => true, fleet.reload, 2000);
  useLiveReload((e) => e.subject === 'rollout' || e.event?.kind === 'offer', rollouts.reload, 1000);
  useEvents(() => setEvents(recentEvents()));
  const f = fleet.data;
  return html`<section>
    <h1>Fleet</h1>
    <${ErrorNote} error=${fleet.error} title="Could not load the fleet" />
    <div class="counts" id="fleet-counts">
      <${Count} id="count-total" label="devices" value=${f?.devices_total} href="#/devices" />
      <${Count} id="count-online" label="online now" value=${f?.online} tone="on" href="#/devices?online=true" />
      <${Count} id="count-in-rollout" label="in a rollout" value=${f?.in_rollout} tone="busy" href="#/rollouts" />
      <${Count} id="count-failing" label="failing" value=${f?.failing} tone=${f?.failing ? 'bad' : ''} href="#/devices?state=failed" />
      <${Count} id="count-rolled-back" label="rolled back" value=${f?.rolled_back} tone=${f?.rolled_back ? 'warn' : ''} href="#/devices?state=rolled_back" />
    </div>
    <div class="columns">
      <div class="card">
        <h2>Devices per version</h2>
        ${f ? html`<${VersionChart} versions=${f.by_version} total=${f.devices_total} />` : null}
      </div>
      <div class="card">
        <h2>Rollouts in progress</h2>
        <${ErrorNote} error=${rollouts.error} title="Could not load rollouts" />
        ${rollouts.data ? html`<${ActiveRollouts} rollouts=${rollouts.data} />` : null}
      </div>
    </div>
    <div class="card">
      <h2>Latest events</h2>
      ${events.length
        ? html`<ul class="events" id="latest-events">
            ${events.slice(0, 30).map((e) => html`<li key=${e.seq}><${Time} at=${e.at} /> ${describeEvent(e)}</li>`)}
          </ul>`
        : html`<p class="empty">Nothing has happened since the server started.</p>`}
    </div>
  </section>`;
}
