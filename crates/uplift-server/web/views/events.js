// Fleet and device events in words, for the overview's feed and a
// device's timeline.
import { bytes, html } from '../lib/ui.js';

const device = (id) => html`<a href=${`#/devices/${encodeURIComponent(id)}`}>${id}</a>`;
const rollout = (id) => html`<a href=${`#/rollouts/${id}`}>rollout ${id}</a>`;
const failure = (error) => (error ? html` <span class="error-text">(${error.kind}: ${error.message})</span>` : null);

// What happened to a device, without saying which device (the timeline
// is one device's already).
export function describeDeviceEvent(event) {
  switch (event.kind) {
    case 'offer':
      return html`offered ${event.version} by ${rollout(event.rollout_id)}`;
    case 'withdrawn':
      return html`offer withdrawn (${rollout(event.rollout_id)} aborted)`;
    case 'download_started':
      return html`started downloading ${event.version}${event.total_bytes ? ` (${bytes(event.total_bytes)})` : ''}`;
    case 'download_finished':
      return html`downloaded ${event.version}: ${bytes(event.fetched_bytes)} fetched, ${bytes(event.reused_bytes)} reused`;
    case 'installed':
      return html`installed ${event.version} to slot ${event.slot}, to be tried at the next boot`;
    case 'reboot':
      return html`rebooted from slot ${event.from_slot} to slot ${event.to_slot}, running ${event.running_version}`;
    case 'committed':
      return html`committed ${event.version} on slot ${event.slot}`;
    case 'rolled_back':
      return html`rolled back${event.version ? ` from ${event.version}` : ''} to ${event.running_version}${failure(event.error)}`;
    case 'error':
      return html`failed${event.version ? ` at ${event.version}` : ''}${failure(event.error)}`;
    case 'removed':
      return html`removed from the fleet by ${event.by}: its key is revoked`;
    default:
      return event.kind;
  }
}

export const DEVICE_EVENT_TONES = {
  offer: 'busy',
  withdrawn: 'off',
  download_started: 'busy',
  download_finished: 'busy',
  installed: 'busy',
  reboot: 'busy',
  committed: 'ok',
  rolled_back: 'warn',
  error: 'bad',
  removed: 'off',
};

function describeRolloutEvent(id, event) {
  switch (event.kind) {
    case 'started':
      return html`${rollout(id)} of ${event.release} started for ${event.devices} devices by ${event.by}`;
    case 'phase_started':
      return html`${rollout(id)}: phase ${event.phase + 1} started`;
    case 'awaiting_approval':
      return html`${rollout(id)}: phase ${event.phase + 1} awaits approval`;
    case 'paused':
      return html`${rollout(id)} paused: ${event.reason}`;
    case 'resumed':
      return html`${rollout(id)} resumed by ${event.by}`;
    case 'approved':
      return html`${rollout(id)}: next phase approved by ${event.by}`;
    case 'aborted':
      return html`${rollout(id)} aborted by ${event.by}`;
    case 'finished':
      return html`${rollout(id)} finished`;
    default:
      return html`${rollout(id)}: ${event.kind}`;
  }
}

// One fleet event (as the stream sends it) in a sentence.
export function describeEvent(fleetEvent) {
  if (fleetEvent.subject === 'device') {
    return html`${device(fleetEvent.device_id)} ${describeDeviceEvent(fleetEvent.event)}`;
  }
  if (fleetEvent.subject === 'rollout') return describeRolloutEvent(fleetEvent.rollout_id, fleetEvent.event);
  return JSON.stringify(fleetEvent);
}
