// Rollouts: the list, the form that starts one (with the server's preview
// of each phase's size), and a rollout's page: each phase's progress and
// its devices, live, with the operator's commands.
import { useEffect, useState } from '../vendor/preact-hooks.js';
import { api } from '../lib/api.js';
import { useLiveReload } from '../lib/live.js';
import { Bar, ErrorNote, html, may, OutcomeBadge, Pager, RolloutBadge, rolloutState, StateBadge, Time, usePager, useResource, when } from '../lib/ui.js';

export function Rollouts({ caller }) {
  const rollouts = useResource(() => api('GET', '/api/v1/rollouts'), []);
  useLiveReload((e) => e.subject === 'rollout' || e.subject === 'device', rollouts.reload, 2000);
  const list = [...(rollouts.data ?? [])].reverse();
  return html`<section>
    <div class="title-row">
      <h1>Rollouts</h1>
      ${may(caller, 'operate') ? html`<a class="button primary" href="#/rollouts/new" id="new-rollout">New rollout</a>` : null}
    </div>
    <${ErrorNote} error=${rollouts.error} title="Could not list rollouts" />
    <div class="table-wrap">
      <table id="rollout-table">
        <thead><tr><th>ID</th><th>Release</th><th>Type</th><th>State</th><th>Phase</th><th>Devices</th><th>Started</th></tr></thead>
        <tbody>
          ${list.map(
            (r) => html`<tr key=${r.id}>
              <td><a href=${`#/rollouts/${r.id}`}>${r.id}</a></td>
              <td><strong>${r.release}</strong></td>
              <td>${r.device_type}</td>
              <td><${RolloutBadge} rollout=${r} /></td>
              <td>${r.progress?.phase != null ? `${r.progress.phase + 1} of ${r.progress.phases}` : '–'}</td>
              <td class="wide"><${Bar} label=${`rollout ${r.id}`} total=${r.devices_total} parts=${countParts(r.counts)} /></td>
              <td><${Time} at=${r.created_at} /></td>
            </tr>`,
          )}
        </tbody>
      </table>
    </div>
    ${rollouts.data && !list.length ? html`<p class="empty">No rollout yet.</p>` : null}
  </section>`;
}

const countParts = (c) => [
  { value: c.succeeded, tone: 'ok', label: 'succeeded' },
  { value: c.failed, tone: 'bad', label: 'failed' },
  { value: c.in_progress, tone: 'busy', label: 'in progress' },
  { value: c.pending, tone: 'off', label: 'pending' },
];

// "1%, 10%, 50%" or "5, 20": phases before the final one.
function parsePhases(text) {
  const phases = [];
  for (const raw of text.split(',').map((p) => p.trim()).filter(Boolean)) {
    const percent = raw.match(/^(\d+)\s*%$/);
    const count = raw.match(/^(\d+)$/);
    if (percent) phases.push({ percent: Number(percent[1]) });
    else if (count) phases.push({ count: Number(count[1]) });
    else throw new Error(`phase "${raw}" is neither a share like 10% nor a device count like 5`);
  }
  return phases;
}

const words = (text) => text.split(/[\s,]+/).map((w) => w.trim()).filter(Boolean);
const number = (text) => (text === '' ? undefined : Number(text));

// The form's fields as the API's RolloutCreate body.
function requestOf(form) {
  const policy = {
    phases: parsePhases(form.phases),
    approval: form.approval,
    error_threshold: { percent: Number(form.errorPercent), min_finished: Number(form.errorMinFinished) },
    soak_seconds: Number(form.soakSeconds || 0),
  };
  if (form.successPercent !== '') policy.success_percent = Number(form.successPercent);
  if (form.deviceTimeout !== '') policy.device_timeout_seconds = Number(form.deviceTimeout);
  if (form.dynamic) policy.dynamic = true;
  if (form.windowCron.trim()) {
    policy.window = {
      cron: form.windowCron.trim(),
      duration_minutes: Number(form.windowMinutes),
      time_zone: form.windowZone.trim() || 'UTC',
      applies_to: form.windowAppliesTo,
    };
  }
  const request = { release: form.release, devices: null, allow_downgrade: form.downgrade, policy, limits: {} };
  if (form.target === 'tags') request.tags = { [form.tagMode]: words(form.tags) };
  if (form.target === 'list') request.devices = words(form.devices);
  if (form.fromVersions.trim()) request.from_versions = words(form.fromVersions);
  if (form.maxDownloading !== '') request.limits.max_downloading = number(form.maxDownloading);
  if (form.maxRate !== '') request.limits.max_bytes_per_sec = Math.round(number(form.maxRate) * 1024 * 1024);
  return request;
}

const BLANK = {
  release: '',
  target: 'type',
  tagMode: 'any',
  tags: '',
  devices: '',
  fromVersions: '',
  phases: '',
  successPercent: '',
  soakSeconds: '0',
  approval: false,
  errorPercent: '0',
  errorMinFinished: '1',
  deviceTimeout: '',
  maxDownloading: '',
  maxRate: '',
  windowCron: '',
  windowMinutes: '60',
  windowZone: 'UTC',
  windowAppliesTo: 'downloads',
  downgrade: false,
  dynamic: false,
};

function Preview({ preview, error }) {
  if (error) return html`<div class="note bad" id="rollout-preview" role="status">${error.kind ? html`<code>${error.kind}</code>: ` : null}${error.message}</div>`;
  if (!preview) return html`<div class="note" id="rollout-preview">Pick a release to see which devices it reaches.</div>`;
  const sizes = preview.phase_sizes;
  return html`<div class="note ok" id="rollout-preview" role="status">
    <strong>${preview.devices_total} devices</strong> of type ${preview.device_type}:
    <ol class="phase-preview">
      ${sizes.map((n, i) => html`<li>${i === sizes.length - 1 ? 'Final phase' : `Phase ${i + 1}`}: <strong>${n}</strong> devices</li>`)}
    </ol>
    ${(preview.warnings ?? []).map((w) => html`<p class="warn-text">${w}</p>`)}
  </div>`;
}

export function NewRollout({ caller }) {
  const releases = useResource(() => api('GET', '/api/v1/releases'), []);
  const [form, setForm] = useState(BLANK);
  const [preview, setPreview] = useState({ data: null, error: null });
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const set = (key) => (e) => setForm({ ...form, [key]: e.target.type === 'checkbox' ? e.target.checked : e.target.value });

  // Asks the server what this form would start, half a second after the
  // last change: the same planning as the start itself.
  useEffect(() => {
    if (!form.release) {
      setPreview({ data: null, error: null });
      return undefined;
    }
    let request;
    try {
      request = requestOf(form);
    } catch (e) {
      setPreview({ data: null, error: e });
      return undefined;
    }
    const controller = new AbortController();
    const timer = setTimeout(() => {
      api('POST', '/api/v1/rollouts/preview', { body: request, signal: controller.signal }).then(
        (data) => setPreview({ data, error: null }),
        (e) => e.name !== 'AbortError' && setPreview({ data: null, error: e }),
      );
    }, 400);
    return () => {
      clearTimeout(timer);
      controller.abort();
    };
  }, [JSON.stringify(form)]);

  const submit = async (e) => {
    e.preventDefault();
    setError(null);
    setBusy(true);
    try {
      const rollout = await api('POST', '/api/v1/rollouts', { body: requestOf(form) });
      location.hash = `#/rollouts/${rollout.id}`;
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
    }
  };

  if (!may(caller, 'operate')) return html`<div class="note bad">Your role (${caller.role}) may not start rollouts.</div>`;
  const list = [...(releases.data ?? [])].reverse();
  return html`<section>
    <p class="crumbs"><a href="#/rollouts">Rollouts</a> /</p>
    <h1>New rollout</h1>
    <form class="rollout-form" onSubmit=${submit} id="rollout-form">
      <fieldset>
        <legend>Release and devices</legend>
        <label>Release
          <select name="release" value=${form.release} onChange=${set('release')} required>
            <option value="">choose…</option>
            ${list.map((r) => html`<option value=${r.version}>${r.version} (${r.device_type})</option>`)}
          </select>
        </label>
        <div class="choice" role="radiogroup" aria-label="target">
          <label><input type="radio" name="target" value="type" checked=${form.target === 'type'} onChange=${set('target')} /> Every device of the release's type</label>
          <label><input type="radio" name="target" value="tags" checked=${form.target === 'tags'} onChange=${set('target')} /> Devices with tags</label>
          <label><input type="radio" name="target" value="list" checked=${form.target === 'list'} onChange=${set('target')} /> A list of devices</label>
        </div>
        ${form.target === 'tags'
          ? html`<div class="row">
              <label>Match<select name="tagMode" value=${form.tagMode} onChange=${set('tagMode')}><option value="any">any of the tags</option><option value="all">all of the tags</option></select></label>
              <label>Tags<input name="tags" value=${form.tags} onInput=${set('tags')} placeholder="lab canary" /></label>
            </div>`
          : null}
        ${form.target === 'list' ? html`<label>Device IDs<textarea name="devices" rows="3" value=${form.devices} onInput=${set('devices')} placeholder="one per line or separated by commas"></textarea></label>` : null}
        <label>Only devices running <input name="fromVersions" value=${form.fromVersions} onInput=${set('fromVersions')} placeholder="any version (or e.g. 1.0 1.1)" /></label>
        <label class="check"><input type="checkbox" name="downgrade" checked=${form.downgrade} onChange=${set('downgrade')} /> Allow a downgrade</label>
        <label class="check"><input type="checkbox" name="dynamic" checked=${form.dynamic} onChange=${set('dynamic')} /> Devices that enroll later join it</label>
      </fieldset>
      <fieldset>
        <legend>Phases and gates</legend>
        <label>Phases before the final one<input name="phases" value=${form.phases} onInput=${set('phases')} placeholder="e.g. 1%, 10%, 50% or 5, 20 (empty: all at once)" /></label>
        <div class="row">
          <label>Success needed to go on (%)<input name="successPercent" type="number" min="1" max="100" value=${form.successPercent} onInput=${set('successPercent')} placeholder="100" /></label>
          <label>Soak time (s)<input name="soakSeconds" type="number" min="0" value=${form.soakSeconds} onInput=${set('soakSeconds')} /></label>
        </div>
        <label class="check"><input type="checkbox" name="approval" checked=${form.approval} onChange=${set('approval')} /> Each phase after the first waits for an operator's approval</label>
        <div class="row">
          <label>Pause when more than (%) failed<input name="errorPercent" type="number" min="0" max="100" value=${form.errorPercent} onInput=${set('errorPercent')} /></label>
          <label>…of at least (finished devices)<input name="errorMinFinished" type="number" min="1" value=${form.errorMinFinished} onInput=${set('errorMinFinished')} /></label>
          <label>Device time-out (s)<input name="deviceTimeout" type="number" min="1" value=${form.deviceTimeout} onInput=${set('deviceTimeout')} placeholder="none" /></label>
        </div>
      </fieldset>
      <fieldset>
        <legend>Pace and window</legend>
        <div class="row">
          <label>Devices downloading at once<input name="maxDownloading" type="number" min="1" value=${form.maxDownloading} onInput=${set('maxDownloading')} placeholder="no limit" /></label>
          <label>Download rate per device (MiB/s)<input name="maxRate" type="number" min="0.01" step="0.01" value=${form.maxRate} onInput=${set('maxRate')} placeholder="no limit" /></label>
        </div>
        <div class="row">
          <label>Window (cron: min hour day month weekday)<input name="windowCron" value=${form.windowCron} onInput=${set('windowCron')} placeholder="none, e.g. 0 2 * * *" /></label>
          <label>Open for (min)<input name="windowMinutes" type="number" min="1" value=${form.windowMinutes} onInput=${set('windowMinutes')} /></label>
          <label>Time zone<input name="windowZone" value=${form.windowZone} onInput=${set('windowZone')} /></label>
          <label>Governs<select name="windowAppliesTo" value=${form.windowAppliesTo} onChange=${set('windowAppliesTo')}><option value="downloads">downloads</option><option value="reboot">reboots only</option></select></label>
        </div>
      </fieldset>
      <${Preview} preview=${preview.data} error=${preview.error} />
      <${ErrorNote} error=${error} title="The rollout was not started" />
      <button type="submit" class="primary" disabled=${busy || !form.release} id="start-rollout">${busy ? 'Starting…' : 'Start rollout'}</button>
    </form>
  </section>`;
}

function Commands({ rollout, onDone }) {
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const state = rolloutState(rollout);
  const run = async (command, question) => {
    if (question && !confirm(question)) return;
    setError(null);
    setBusy(true);
    try {
      const result = await api('POST', `/api/v1/rollouts/${rollout.id}/${command}`);
      if (command === 'retry') location.hash = `#/rollouts/${result.id}`;
      onDone();
    } catch (e) {
      setError(e);
    } finally {
      setBusy(false);
    }
  };
  const open = !['finished', 'aborted', 'superseded'].includes(state);
  return html`<div class="commands" id="rollout-commands">
    ${state === 'running' || state === 'awaiting_approval' ? html`<button type="button" disabled=${busy} onClick=${() => run('pause')} id="cmd-pause">Pause</button>` : null}
    ${state === 'paused' ? html`<button type="button" class="primary" disabled=${busy} onClick=${() => run('resume')} id="cmd-resume">Resume</button>` : null}
    ${state === 'awaiting_approval' ? html`<button type="button" class="primary" disabled=${busy} onClick=${() => run('approve')} id="cmd-approve">Approve next phase</button>` : null}
    ${rollout.counts.failed > 0 ? html`<button type="button" disabled=${busy} onClick=${() => run('retry', `Start a new rollout of the ${rollout.counts.failed} devices that failed?`)} id="cmd-retry">Retry failed</button>` : null}
    ${open ? html`<button type="button" class="danger" disabled=${busy} onClick=${() => run('abort', `Abort rollout ${rollout.id}? Devices not yet upgraded are not offered it again.`)} id="cmd-abort">Abort</button>` : null}
    <${ErrorNote} error=${error} />
  </div>`;
}

function Phases({ rollout }) {
  const progress = rollout.progress;
  if (!progress) return null;
  const tallies = progress.phase_tallies ?? [];
  return html`<ol class="phases" id="rollout-phases">
    ${tallies.map((t, i) => {
      const current = progress.phase === i && !['finished', 'aborted'].includes(progress.state);
      const name = i === tallies.length - 1 ? 'Final phase' : `Phase ${i + 1}`;
      return html`<li class=${current ? 'current' : ''} data-phase=${i}>
        <span class="phase-name">${name}${current ? html` <span class="muted">(now)</span>` : null}</span>
        <${Bar}
          label=${name}
          total=${t.devices}
          parts=${[
            { value: t.succeeded, tone: 'ok', label: 'succeeded' },
            { value: t.failed, tone: 'bad', label: 'failed' },
            { value: Math.max(0, t.offered - t.succeeded - t.failed), tone: 'busy', label: 'in progress' },
            { value: Math.max(0, t.devices - t.offered), tone: 'off', label: 'not offered yet' },
          ]}
        />
        <span class="phase-count">${t.succeeded} / ${t.devices}</span>
      </li>`;
    })}
  </ol>`;
}

const OUTCOME_FILTERS = [
  ['', 'any'],
  ['unfinished', 'not finished'],
  ['succeeded', 'succeeded'],
  ['failed', 'failed'],
  ['timed_out', 'timed out'],
  ['withdrawn', 'withdrawn'],
  ['superseded', 'superseded'],
];

// The rollout's devices, a page at a time (a rollout may hold 100 000).
function Members({ id, phases }) {
  const [phase, setPhase] = useState('');
  const [outcome, setOutcome] = useState('');
  const pager = usePager(`${id}/${phase}/${outcome}`);
  const members = useResource(
    () => api('GET', `/api/v1/rollouts/${id}/devices`, { query: { phase, outcome, after: pager.current, limit: 100 } }),
    [id, phase, outcome, pager.current],
  );
  useLiveReload((e) => e.subject === 'device' || (e.subject === 'rollout' && e.rollout_id === Number(id)), members.reload, 1500);
  const list = members.data?.devices ?? [];
  const phaseName = (p) => (p === phases - 1 ? 'final' : String(p + 1));
  return html`<div class="card">
    <div class="title-row">
      <h2>Devices</h2>
      <div class="row">
        <label>Phase <select value=${phase} onChange=${(e) => setPhase(e.target.value)} id="member-phase">
          <option value="">all</option>
          ${Array.from({ length: phases }, (_, i) => html`<option value=${i}>${phaseName(i)}</option>`)}
        </select></label>
        <label>Outcome <select value=${outcome} onChange=${(e) => setOutcome(e.target.value)} id="member-outcome">
          ${OUTCOME_FILTERS.map(([value, label]) => html`<option value=${value}>${label}</option>`)}
        </select></label>
      </div>
    </div>
    <${ErrorNote} error=${members.error} />
    <div class="table-wrap">
      <table id="member-table">
        <thead><tr><th>Device</th><th>Phase</th><th>Outcome</th><th>State</th><th>Version</th><th>Offered</th><th>Error</th></tr></thead>
        <tbody>
          ${list.map(
            (m) => html`<tr key=${m.device_id} data-device=${m.device_id}>
              <td><a href=${`#/devices/${encodeURIComponent(m.device_id)}`}><code>${m.device_id}</code></a></td>
              <td>${phaseName(m.phase)}</td>
              <td><${OutcomeBadge} outcome=${m.outcome} offered=${m.offered_at} /></td>
              <td><${StateBadge} state=${m.state} /></td>
              <td>${m.running_version ?? '–'}</td>
              <td>${m.offered_at ? html`<${Time} at=${m.offered_at} />` : '–'}</td>
              <td class="error-text">${m.error ?? ''}</td>
            </tr>`,
          )}
        </tbody>
      </table>
    </div>
    ${members.data && !list.length ? html`<p class="empty">No device matches.</p>` : null}
    <${Pager} pager=${pager} next=${members.data?.next} count=${list.length} />
  </div>`;
}

export function RolloutPage({ id, caller }) {
  const rollout = useResource(() => api('GET', `/api/v1/rollouts/${id}`), [id]);
  useLiveReload(
    (e) => (e.subject === 'rollout' && e.rollout_id === Number(id)) || e.subject === 'device',
    rollout.reload,
    1000,
  );
  const r = rollout.data;
  return html`<section>
    <p class="crumbs"><a href="#/rollouts">Rollouts</a> /</p>
    <${ErrorNote} error=${rollout.error} title="Could not load the rollout" />
    ${r
      ? html`<div class="title-row">
            <h1>Rollout ${r.id}: ${r.release} <${RolloutBadge} rollout=${r} /></h1>
            ${may(caller, 'operate') ? html`<${Commands} rollout=${r} onDone=${rollout.reload} />` : null}
          </div>
          ${r.progress?.paused_because ? html`<div class="note warn" role="alert" id="paused-because"><strong>Paused:</strong> ${r.progress.paused_because}</div>` : null}
          <div class="card">
            <dl class="facts compact">
              <dt>Device type</dt><dd>${r.device_type}</dd>
              <dt>Devices</dt><dd>${r.devices_total}${r.superseded ? ` (${r.superseded} moved to newer rollouts)` : ''}</dd>
              <dt>Target</dt><dd>${r.tags ? `devices with ${Object.keys(r.tags)[0]} of the tags ${Object.values(r.tags)[0].join(', ')}` : `devices of type ${r.device_type} (all, or the ones listed)`}${r.from_versions?.length ? `, running ${r.from_versions.join(' or ')}` : ''}</dd>
              <dt>Started</dt><dd>${when(r.created_at)}</dd>
              ${r.waiting_for_turn ? html`<dt>Waiting for a download turn</dt><dd>${r.waiting_for_turn}</dd>` : null}
              ${r.progress?.policy?.window ? html`<dt>Window</dt><dd><code>${r.progress.policy.window.cron}</code> for ${r.progress.policy.window.duration_minutes} min (${r.progress.policy.window.time_zone}), governs ${r.progress.policy.window.applies_to ?? 'downloads'}</dd>` : null}
            </dl>
            <h2>Overall</h2>
            <${Bar} label="overall" total=${r.devices_total} parts=${countParts(r.counts)} />
            <h2>Phases</h2>
            <${Phases} rollout=${r} />
          </div>
          <${Members} id=${id} phases=${r.progress?.phases ?? 1} />`
      : null}
  </section>`;
}
